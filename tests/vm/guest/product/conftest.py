"""Fixtures for product tests in the guest; they live in vmlib.product so the xen tests share them."""

from vmlib.product import journal, xb

__all__ = ["journal", "xb"]

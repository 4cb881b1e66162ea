"""Fixtures for product tests in the guest (the helpers live in vmlib.product, shared with the xen tests)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from vmlib.product import Journal, Xb, fresh_product


@pytest.fixture
def xb() -> Iterator[Xb]:
    yield from fresh_product()


@pytest.fixture
def journal() -> Journal:
    return Journal()

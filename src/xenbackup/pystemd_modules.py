"""pystemd's modules without its package __init__.

pystemd/__init__.py imports its whole D-Bus object layer, and with it lxml, for shortcuts this code never
uses. Under the test bed's emulation that cost 0.2 s in every process that logs to the journal or notifies
systemd, which is every step of every run, for what is one C call each (sendv, notify).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType


def load(submodule: str) -> ModuleType:
    """pystemd.<submodule>, imported without running the package's __init__ unless something already did.

    The package stands in sys.modules as its bare module object (its path set, its body not run): the
    import system finds every submodule through that path, and pystemd's own modules import each other by
    submodule (pystemd.utils, pystemd.base, ...), never through the package's shortcuts.
    Raises ImportError when pystemd is not installed.
    """
    if "pystemd" not in sys.modules:
        spec = importlib.util.find_spec("pystemd")
        if spec is None or spec.submodule_search_locations is None:
            raise ModuleNotFoundError("No module named 'pystemd'", name="pystemd")
        sys.modules["pystemd"] = importlib.util.module_from_spec(spec)
    return importlib.import_module(f"pystemd.{submodule}")

"""Optional dependencies (`pip install 'vitscope[EXTRA]'`), imported where a command needs them."""
from __future__ import annotations

import importlib

from .errors import VitscopeError


def require(extra: str, purpose: str, *modules: str) -> list:
    """The modules, imported; one missing is a user error naming the extra that installs it."""
    imported = []
    for name in modules:
        try:
            imported.append(importlib.import_module(name))
        except ImportError:
            raise VitscopeError(f"{purpose} needs the {name} package: pip install 'vitscope[{extra}]'") from None
    return imported

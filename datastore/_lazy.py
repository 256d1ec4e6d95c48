"""Lazy package exports (PEP 562), so that importing one light module of a package (``datastore.errors``
from the CLI) does not import the heavy ones (pyarrow, torch) that the package's public API re-exports."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for `package`: attribute ``name`` is imported from module ``exports[name]``
    on first use (then cached in the package's namespace). Unknown names raise `AttributeError`."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__

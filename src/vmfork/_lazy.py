"""Lazy package exports (PEP 562): a package names what it exports and from which submodule, and the submodule is
imported on first use. The CLI imports every command's package to register its arguments; with this it does not
pay for numpy and capstone unless the command runs."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` that resolves each name in `exports` ({name: submodule}) on demand."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        globals_of_package = importlib.import_module(package).__dict__
        globals_of_package[name] = value            # later lookups skip __getattr__
        return value

    return __getattr__

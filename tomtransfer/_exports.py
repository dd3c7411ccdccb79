"""Lazy public surfaces for the packages' `__init__`: `from tomtransfer.services.trainer import run_training` works,
and importing a package does not import what it names (torch, Ray, scipy load only when a name is used)."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy(package: str, names: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """`names`: public name -> the submodule (relative to `package`) that defines it. Returns the package's
    `__getattr__` and `__dir__` (PEP 562)."""

    def __getattr__(name: str) -> object:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__

"""PEP 562 lazy exports: a package names what it offers without importing it, so `import bitalloc`,
`bitalloc --help` and re-planning from a saved profile do not pay for torch and transformers."""

from __future__ import annotations

import importlib
import sys
import types
from typing import Callable


class _ExportingPackage(types.ModuleType):
    """Keeps an exported function when the import system binds a same-named submodule over it.

    `bitalloc.plan` is the function, `bitalloc/plan.py` the module: importing the module makes the
    import system set the package attribute `plan` to it. Eager imports used to rebind the function
    afterwards; lazily, that binding is skipped instead, and the export is resolved on access.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and name in self.__dict__.get("_LAZY_EXPORTS", ()):
            return
        super().__setattr__(name, value)


def lazy_exports(package: str, where: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """(__getattr__, __dir__) for `package`; where: exported name -> submodule (relative, e.g. '.api')."""
    module = sys.modules[package]
    module._LAZY_EXPORTS = dict(where)
    module.__class__ = _ExportingPackage

    def __getattr__(name: str) -> object:
        if name not in where:  # a submodule (`bitalloc.api`), as when the package imported everything eagerly
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(where[name], package), name)
        setattr(module, name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(where) | set(vars(module)))

    return __getattr__, __dir__


class LazyModule:
    """`torch = LazyModule("torch")`: the module is imported on first attribute access.

    The format families (bitalloc/formats) keep their option rules and their numerics in one file;
    the rules are needed to read a plan or parse a label without torch, the numerics only then."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> object:
        value = getattr(importlib.import_module(self._name), attr)
        setattr(self, attr, value)  # later lookups are plain attribute hits
        return value

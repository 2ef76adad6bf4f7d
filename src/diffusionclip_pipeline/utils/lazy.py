"""Lazy package exports (PEP 562): names imported from their module when first used, so that importing a package
(e.g. for the ``diffusionclip`` command's ``--help``) does not import torch, diffusers or transformers."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping


def lazy_exports(
    package: str, exports: Mapping[str, str], namespace: dict, submodules: Iterable[str] = ()
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``: ``exports`` maps a name to the submodule that defines it,
    ``namespace`` is the package's ``globals()`` (a name, once imported, is cached there) and ``submodules`` may be
    reached as attributes without importing them first."""
    submodules = tuple(submodules)

    def __getattr__(name: str):
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value  # later look-ups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(namespace.get("__all__", ())))

    return __getattr__, __dir__

"""Deprecated location of the ``diffusionclip`` command: use `diffusionclip_pipeline.commands` (removed in 0.3).

The command is `diffusionclip_pipeline.commands.main.main`; plugins register with
`diffusionclip_pipeline.commands.register_model` / `register_command`. This module re-exports the old public names,
so that third-party plugins calling ``diffusionclip_pipeline.cli.register_model`` keep working (they register with
the same registry), and ``python -m diffusionclip_pipeline.cli`` still runs the command (without a warning).
Importing it warns with a `FutureWarning`.
"""

from __future__ import annotations

import sys
import types
import warnings

from .commands import (
    PLUGIN_GROUP,
    CLIError,
    check_device,
    check_output,
    checked,
    load_pipeline,
    load_plugins,
    register_command,
    register_model,
    set_num_threads,
)
from .commands import registry as _registry_module
from .commands.main import build_parser, main
from .commands.registry import _Registry  # noqa: F401  (old tests make a fresh one)
from .utils.logging import quiet_loading

__all__ = [
    "PLUGIN_GROUP",
    "CLIError",
    "build_parser",
    "check_device",
    "check_output",
    "checked",
    "load_pipeline",
    "load_plugins",
    "main",
    "quiet_loading",
    "register_command",
    "register_model",
    "set_num_threads",
]

_FORWARDED = ("_registry", "entry_points")  # set on this module, they are set on the registry (old monkeypatches)


class _Shim(types.ModuleType):
    def __getattr__(self, name: str):
        if name in _FORWARDED:
            return getattr(_registry_module, name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name in _FORWARDED:
            setattr(_registry_module, name, value)
        else:
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Shim

if __name__ == "__main__":
    sys.exit(main())
else:
    warnings.warn(
        "`diffusionclip_pipeline.cli` moved to `diffusionclip_pipeline.commands` (the command: "
        "`diffusionclip_pipeline.commands.main.main`); the old path will be removed in 0.3.",
        FutureWarning,
        stacklevel=2,
    )

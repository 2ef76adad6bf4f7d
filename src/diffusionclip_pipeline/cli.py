"""Deprecated location of the ``diffusionclip`` command: use `diffusionclip_pipeline.commands` (removed in 0.3).

The command is `diffusionclip_pipeline.commands.main.main`; plugins register with
`diffusionclip_pipeline.commands.register_model` / `register_command`. This module re-exports the old public names,
so that third-party plugins calling ``diffusionclip_pipeline.cli.register_model`` keep working (they register with
the same registry), and ``python -m diffusionclip_pipeline.cli`` still runs the command (without a warning).
Importing it warns with a `FutureWarning`.
"""

from __future__ import annotations

import sys
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
from .commands.main import build_parser, main
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

if __name__ == "__main__":
    sys.exit(main())
else:
    warnings.warn(
        "`diffusionclip_pipeline.cli` moved to `diffusionclip_pipeline.commands` (the command: "
        "`diffusionclip_pipeline.commands.main.main`); the old path will be removed in 0.3.",
        FutureWarning,
        stacklevel=2,
    )

"""Deprecated location of the web app: use `diffusionclip_pipeline.commands.app` (removed in 0.3).

This module re-exports the app's public names; ``python -m diffusionclip_pipeline.app`` still serves the app
(without a warning), as ``diffusionclip app`` and ``python -m diffusionclip_pipeline.commands.app`` do. Importing it
warns with a `FutureWarning`.
"""

from __future__ import annotations

import sys
import warnings

from .commands.app import *  # noqa: F403
from .commands.app import NO_ADAPTER, __all__, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
else:
    warnings.warn(
        "`diffusionclip_pipeline.app` moved to `diffusionclip_pipeline.commands.app`; the old path will be removed "
        "in 0.3.",
        FutureWarning,
        stacklevel=2,
    )

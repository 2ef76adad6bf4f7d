"""Score saved edits with the success measure before the shape criterion and with today's shape-aware one (issue 27).

The scripts' ``--save-images`` write ``.npz`` files with ``sources`` and ``edited`` uint8 arrays; this scores each with
`testbed.world.edit_success` as it was before commit c5b0ff3 (read from git history, so the checkout must be a git
clone) and as it is now, so that "published -> re-measured" can be split into what the run changed and what the
measure changed. One JSON line per file.

    python scripts/testbed/rescore.py build/transfer/heldout-recommended-red-blue-circle-seed5.npz,blue \
        build/edits/red-red-circle-square-pixel-seed0.npz,red,square
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402, F401  (puts src/ on the path)

from diffusionclip_pipeline.testbed import world  # noqa: E402

OLD_MEASURE_COMMIT = "c5b0ff3^"  # the last commit before the shape criterion
WORLD_PATH = "src/diffusionclip_pipeline/testbed/world.py"


def old_world():
    """`testbed.world` as it was at `OLD_MEASURE_COMMIT`, imported from git history."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    source = subprocess.run(
        ["git", "-C", root, "show", f"{OLD_MEASURE_COMMIT}:{WORLD_PATH}"], check=True, capture_output=True, text=True
    ).stdout
    with tempfile.NamedTemporaryFile("w", suffix="_world_old.py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("world_old", f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(f.name)
    return module


def rescore(path: str, old, target_colour: str | None, target_shape: str | None = None) -> dict:
    data = np.load(path)
    sources, edited = data["sources"], data["edited"]
    kwargs = dict(target_colour=target_colour, target_shape=target_shape)
    before = [old.edit_success(s, e, **kwargs) for s, e in zip(sources, edited)]
    now = [world.edit_success(s, e, **kwargs) for s, e in zip(sources, edited)]
    return dict(
        file=os.path.basename(path), n=len(sources),
        old=float(np.mean([r["success"] for r in before])), new=float(np.mean([r["success"] for r in now])),
        shapes={str(k): int(sum(r["shape"] == k for r in now)) for k in (*world.SHAPES, None)},
        lost_to_shape=int(sum(o["success"] and not n["success"] for o, n in zip(before, now))),
    )  # fmt: skip


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return
    old = old_world()
    for arg in sys.argv[1:]:
        path, colour, shape = (arg.split(",") + ["", ""])[:3]
        print(json.dumps(rescore(path, old, colour or None, shape or None)), flush=True)


if __name__ == "__main__":
    main()

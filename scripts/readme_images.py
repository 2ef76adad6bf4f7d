"""Regenerates the README's pictures from the commands the README documents, so that they never go stale.

    python scripts/readme_images.py            # runs `diffusionclip demo --num-test 8` and copies its picture

For each picture it runs the documented command in a temporary folder (one torch thread), copies the image it writes
into ``docs/images/`` and prints the command's own summary (the success rate), which the README's caption must state
as printed. Offline; about 2-4 minutes on one CPU core.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = os.path.join(ROOT, "docs", "images")
# (the README's command, the file it writes inside --output, the README's picture)
PICTURES = [
    (["diffusionclip", "demo", "--num-test", "8"], "before_after.png", "demo_before_after.png"),
]


def main() -> int:
    for command, written, picture in PICTURES:
        with tempfile.TemporaryDirectory(prefix="readme-images-") as folder:
            output = os.path.join(folder, "out")
            argv = [*command, "--output", output, "--threads", "1", "--quiet"]
            print("$ " + " ".join(command), flush=True)
            start = time.perf_counter()
            done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            print(done.stdout.rstrip())
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return done.returncode
            shutil.copyfile(os.path.join(output, written), os.path.join(IMAGES, picture))
            print(f"-> docs/images/{picture} ({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

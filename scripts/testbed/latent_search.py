"""Bounded settings search on the latent test-bed: one fine-tune, several edit settings scored on the same images.

For each fine-tune variant (``--set``): fine-tune red -> blue circle on 16 rendered circles of data seed ``--seed``
(`testbed.demo.run_edit_experiment` with the latent recommendations underneath), then edit ``--num-test`` circles of
seed ``seed + 1`` with each edit variant (``--edits NAME:KEY=VALUE,KEY=VALUE``; ``base`` is the recommended edit)
and score them with `testbed.edit_success`. One JSON line per (fine-tune, edit) in ``--json``. One torch thread.

    python scripts/testbed/latent_search.py --set learning_rate=1e-3 --tag lr1e-3 \
        --edits base t500:t0=500 s15:edit_strength=1.5 --seed 5 --json build/latent/search.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import parse_settings  # noqa: E402  (puts src/ on the path)

from diffusionclip_pipeline.testbed import edit_success, load_pipeline  # noqa: E402
from diffusionclip_pipeline.testbed.demo import run_edit_experiment  # noqa: E402
from diffusionclip_pipeline.testbed.settings import recommended  # noqa: E402


def parse_pairs(text: str, option: str) -> dict:
    """``"KEY=VALUE,KEY=VALUE"`` -> settings (see `_common.parse_settings`)."""
    return parse_settings([item for item in text.split(",") if item], option)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", help="latent test-bed folder (default: the shipped one)")
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE")
    p.add_argument("--tag", default="recommended")
    p.add_argument("--edits", nargs="+", default=["base"], metavar="NAME[:KEY=VALUE,...]")
    p.add_argument("--pair", default="red:blue:circle")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--num-test", type=int, default=32)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    overrides = parse_settings(args.set)
    edits = {}
    for spec in args.edits:
        name, _, rest = spec.partition(":")
        edits[name] = parse_pairs(rest, "--edits")
    source, target, shape = args.pair.split(":")
    pipe = load_pipeline(args.weights, kind="latent")
    first = next(iter(edits))
    result = run_edit_experiment(pipe, source, target, shape=shape, num_test=args.num_test, seed=args.seed,
                                 finetune_kwargs=overrides, edit_kwargs=edits[first], kind="latent")  # fmt: skip
    _, recommended_edit = recommended("latent")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    for name, edit in edits.items():
        start = time.perf_counter()
        if name == first:
            reports, edit_s = result["reports"], result["edit_seconds"]
        else:
            edited = pipe.edit(result["sources"], **{**recommended_edit, **edit}).images
            reports = [edit_success(s, e, target_colour=target) for s, e in zip(result["sources"], edited)]
            edit_s = time.perf_counter() - start
        criteria = {k: float(np.mean([bool(r[k]) for r in reports])) for k in reports[0] if k.endswith("_ok")}
        record = dict(tag=args.tag, settings=overrides, edit=name, edit_settings=edit, pair=args.pair, seed=args.seed,
                      num_test=args.num_test, success=float(np.mean([r["success"] for r in reports])),
                      criteria=criteria, background=float(np.mean([r["background"] for r in reports])),
                      train_seconds=round(result["train_seconds"], 1), edit_seconds=round(edit_s, 1))  # fmt: skip
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{args.tag} / {name}: success {record['success']:.0%} {criteria}", flush=True)


if __name__ == "__main__":
    main()

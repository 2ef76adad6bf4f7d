"""Bounded settings search on a test-bed: one fine-tune per pair, several edit settings scored on the same images.

For each pair (``--pairs source:target:shape``) fine-tune ``source shape -> target shape`` on 16 rendered images of
data seed ``--seed`` with the test-bed's recommended settings under ``--set`` (`testbed.demo.run_edit_experiment`),
then edit ``--num-test`` images of seed ``seed + 1`` with each edit variant (``--edits NAME:KEY=VALUE,KEY=VALUE``;
``base`` is the recommended edit) and score them with the shape-aware `testbed.edit_success`. Stochastic edits
(``encoding=noise``) get a generator seeded with ``--seed``. One JSON line per (pair, edit) in ``--json``; one torch
thread. A pair ``source:source:shape:target_shape`` is a shape edit; the edit key ``adapter_min_t=T`` applies the
adapter only at timesteps ``t >= T`` (the original model below, through ``adapters=``); ``--single-clip`` leaves out
the second CLIP; ``--save-images DIR`` keeps every edit's images (``DIR/<pair>-<kind>-seed<seed>-<tag>-<edit>.npz``)
for `rescore.py`.

    python scripts/testbed/settings_search.py --kind latent --set learning_rate=1e-3 --tag lr1e-3 \
        --edits base t500:t0=500 s15:edit_strength=1.5 --seed 5 --json build/latent/search.jsonl
    python scripts/testbed/settings_search.py --kind flow --pairs red:blue:circle green:yellow:triangle \
        --edits base fast6:encoding=noise,num_inference_steps=6 --seed 5 --json build/flow/search.jsonl
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

from _common import parse_settings, save_edits  # noqa: E402  (puts src/ on the path)

from diffusionclip_pipeline.testbed import edit_success, load_pipeline  # noqa: E402
from diffusionclip_pipeline.testbed.demo import run_edit_experiment  # noqa: E402
from diffusionclip_pipeline.testbed.settings import recommended  # noqa: E402


def parse_pairs(text: str, option: str) -> dict:
    """``"KEY=VALUE,KEY=VALUE"`` -> settings (see `_common.parse_settings`)."""
    return parse_settings([item for item in text.split(",") if item], option)


def seeded(edit: dict, seed: int) -> dict:
    """``edit`` with a generator seeded with ``seed`` when its encoding draws noise."""
    if edit.get("encoding") == "noise":
        return dict(edit, generator=torch.Generator().manual_seed(seed))
    return edit


def edit_arguments(edit: dict, seed: int) -> dict:
    """An ``--edits`` entry -> `edit` keyword arguments: ``adapter_min_t`` becomes an ``adapters=`` step function
    (the fine-tuned adapter ``default`` at ``t >= adapter_min_t``, the original model below); noise gets a seed."""
    edit = dict(edit)
    min_t = edit.pop("adapter_min_t", None)
    if min_t is not None:
        edit["adapters"] = {"default": lambda t, min_t=min_t: 1.0 if int(t) >= min_t else 0.0}
    return seeded(edit, seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", choices=("pixel", "latent", "flow"), default="latent")
    p.add_argument("--weights", help="test-bed folder (default: the shipped one of --kind)")
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE")
    p.add_argument("--tag", default="recommended")
    p.add_argument("--edits", nargs="+", default=["base"], metavar="NAME[:KEY=VALUE,...]")
    p.add_argument("--pairs", nargs="+", default=["red:blue:circle"], metavar="SOURCE:TARGET:SHAPE")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--num-test", type=int, default=32)
    p.add_argument("--single-clip", action="store_true", help="leave out the second CLIP (clip_2/)")
    p.add_argument("--save-images", metavar="DIR", help="keep each edit's sources and edited images (npz)")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    overrides = parse_settings(args.set)
    edits = {}
    for spec in args.edits:
        name, _, rest = spec.partition(":")
        edits[name] = parse_pairs(rest, "--edits")
    pairs = []
    for pair in args.pairs:  # all checked before any fine-tuning
        parts = pair.split(":")
        if len(parts) not in (3, 4):
            p.error(f"--pairs takes source:target:shape[:target_shape], got {pair!r}")
        pairs.append((pair, *parts[:3], parts[3] if len(parts) == 4 else None))
    pipe = load_pipeline(args.weights, kind=args.kind, second_clip=not args.single_clip)
    pipe.set_progress_bar_config(disable=True)
    _, recommended_edit = recommended(args.kind)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    first = next(iter(edits))
    for pair, source, target, shape, target_shape in pairs:
        target_colour = None if target == source and target_shape else target
        result = run_edit_experiment(
            pipe, source, target_colour, shape=shape, target_shape=target_shape, num_test=args.num_test,
            seed=args.seed, finetune_kwargs=overrides, edit_kwargs=edit_arguments(edits[first], args.seed),
        )  # fmt: skip
        for name, edit in edits.items():
            start = time.perf_counter()
            if name == first:
                reports, edit_s, edited = result["reports"], result["edit_seconds"], result["edited"]
            else:
                edited = pipe.edit(result["sources"], **{**recommended_edit, **edit_arguments(edit, args.seed)}).images
                reports = [
                    edit_success(s, e, target_colour=target_colour, target_shape=target_shape)
                    for s, e in zip(result["sources"], edited)
                ]
                edit_s = time.perf_counter() - start
            if args.save_images:
                stem = f"{pair.replace(':', '-')}-{args.kind}-seed{args.seed}-{args.tag}-{name}"
                save_edits(args.save_images, stem, result["sources"], edited)
            criteria = {
                k: float(np.mean([bool(r[k]) for r in reports]))
                for k in reports[0]
                if k.endswith("_ok") or k == "colour_kept"
            }
            record = dict(
                kind=args.kind, tag=args.tag, settings=overrides, edit=name, edit_settings=edit, pair=pair,
                seed=args.seed, num_test=args.num_test, clip_models=len(pipe.clip_models),
                success=float(np.mean([r["success"] for r in reports])),
                criteria=criteria, background=float(np.mean([r["background"] for r in reports])),
                train_seconds=round(result["train_seconds"], 1), edit_seconds=round(edit_s, 1),
            )  # fmt: skip
            with open(args.json, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"{args.tag} / {pair} / {name}: success {record['success']:.0%} {criteria}", flush=True)
        pipe.unload_lora_weights()


if __name__ == "__main__":
    main()

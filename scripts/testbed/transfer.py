"""Transfer of the test-bed's recommended recipe to a model it was not chosen on, with the "half-way colour" probe.

For each model (``--models NAME=FOLDER``; ``shipped`` is the package's test-bed) and each colour edit and data seed:
fine-tune on 16 rendered source images (seed ``s``), edit ``--num-test`` others (seed ``s + 1``), score with the
world's success criterion (`testbed.edit_success`, colour purity included), and measure in the training CLIP's
image space how far the edit went along the text direction:

- ``cos``: mean cosine between ``dE = E_I(edited) - E_I(source)`` and the text direction ``dT``;
- ``proj``: mean length of ``dE`` along ``dT`` (``dE . dT / |dT|``);
- ``proj_ideal``: the same for the ideal edit (the same shapes rendered in the target colour), and ``reach`` =
  ``proj / proj_ideal``: 1 means the edit went as far along ``dT`` as a perfect recolouring; a short, well-aimed
  edit (``cos`` high, ``reach`` < 1) is the half-way colour;
- the same (``*_2``) in the shipped second CLIP (``clip_2/``, trained on off-palette colours), measured whether or
  not the run trained with it: a CLIP that the edit fools reaches 1 where one that sees the colour does not.

One JSON line per run in ``--json`` (runs already there are skipped: resumable). One torch thread.

    python scripts/testbed/transfer.py --models shipped heldout=build/testbed/heldout/weights \
        --pairs red:blue:circle green:yellow:square --seeds 0 1 --json build/transfer/report.jsonl
    python scripts/testbed/transfer.py --models heldout=... --set global_clip_loss_weight=1.0 --tag g1 ...
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import parse_settings, save_edits  # noqa: E402  (puts src/ on the path)

from diffusionclip_pipeline.image_processing import preprocess_image  # noqa: E402
from diffusionclip_pipeline.testbed import load_pipeline, world  # noqa: E402
from diffusionclip_pipeline.testbed.demo import run_edit_experiment  # noqa: E402
from diffusionclip_pipeline.training.losses import CLIPDirectionalLoss  # noqa: E402


@torch.no_grad()
def reach(clip, size: int, sources, edited, ideal, prompt_src: str, prompt_tar: str) -> dict:
    """cos / projection of the edit's image change in ``clip`` = ``(CLIPModel, tokenizer)`` on its text direction,
    against the ideal edit's."""
    fn = CLIPDirectionalLoss(*clip)
    d_text = fn.text_direction(prompt_src, prompt_tar)
    unit = d_text / d_text.norm()
    e_src, e_edit, e_ideal = (fn.encode_images(preprocess_image(x, size)) for x in (sources, edited, ideal))
    d_edit, d_ideal = e_edit - e_src, e_ideal - e_src
    proj, proj_ideal = d_edit @ unit, d_ideal @ unit
    return {
        "cos": float(F.cosine_similarity(d_edit, unit[None], dim=-1).mean()),
        "cos_ideal": float(F.cosine_similarity(d_ideal, unit[None], dim=-1).mean()),
        "proj": float(proj.mean()),
        "proj_ideal": float(proj_ideal.mean()),
        "reach": float((proj / proj_ideal).mean()),
        "norm": float(d_edit.norm(dim=-1).mean()),
        "norm_ideal": float(d_ideal.norm(dim=-1).mean()),
    }


@functools.cache  # loaded once per process, measured with every run
def second_clip_pair():
    from transformers import CLIPModel, CLIPTokenizer

    from diffusionclip_pipeline.testbed import WEIGHTS_DIR

    return (CLIPModel.from_pretrained(os.path.join(WEIGHTS_DIR, "clip_2"), dtype=torch.float32),
            CLIPTokenizer.from_pretrained(os.path.join(WEIGHTS_DIR, "tokenizer_2")))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["shipped"], help="shipped or NAME=FOLDER (pixel test-bed layout)")
    p.add_argument("--pairs", nargs="+", default=["red:blue:circle", "green:yellow:square"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--num-test", type=int, default=32)
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="finetune settings over RECOMMENDED")
    p.add_argument("--edit-set", nargs="*", default=[], metavar="NAME=VALUE", help="edit settings over RECOMMENDED")
    p.add_argument("--tag", default="recommended", help="name of this settings variant in the records")
    p.add_argument("--single-clip", action="store_true", help="one CLIP for every model (default: the held-out "
                   "models use one, the shipped model its two)")  # fmt: skip
    p.add_argument("--second-clip", action="store_true", help="train with the folder's second CLIP (clip_2/) on "
                   "every model that has one")  # fmt: skip
    p.add_argument("--json", required=True)
    p.add_argument("--save-images", metavar="DIR", help="write each run's source and edited images (npz) to DIR")
    args = p.parse_args()
    torch.set_num_threads(1)
    overrides, edit_overrides = parse_settings(args.set), parse_settings(args.edit_set, "--edit-set")
    done = set()
    if os.path.exists(args.json):
        done = {(r["model"], r["pair"], r["seed"], r["tag"]) for r in map(json.loads, open(args.json)) if r}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    for spec in args.models:
        name, _, folder = spec.partition("=")
        for pair in args.pairs:
            source, target, shape = pair.split(":")
            for seed in args.seeds:
                if (name, pair, seed, args.tag) in done:
                    continue
                second_clip = (name == "shipped" or args.second_clip) and not args.single_clip
                pipe = load_pipeline(folder or None, second_clip=second_clip)
                start = time.perf_counter()
                result = run_edit_experiment(pipe, source, target, shape=shape, num_test=args.num_test, seed=seed,
                                             finetune_kwargs=overrides, edit_kwargs=edit_overrides)  # fmt: skip
                _, metas = world.render_dataset(args.num_test, seed=seed + 1, size=pipe.resolution, shape=shape,
                                                colour=source)  # fmt: skip
                ideal = [world.render_shape(shape, target, m["cx"], m["cy"], m["r"], m["size"]) for m in metas]
                if args.save_images:  # to score the same edits again without fine-tuning
                    stem = f"{name}-{args.tag}-{pair.replace(':', '-')}-seed{seed}"
                    save_edits(args.save_images, stem, result["sources"], result["edited"])
                record = dict(
                    model=name, pair=pair, seed=seed, tag=args.tag, settings=overrides, edit_settings=edit_overrides,
                    clip_models=len(pipe.clip_models), success=result["success_rate"], criteria=result["criteria"],
                    background=float(np.mean([r["background"] for r in result["reports"]])),
                    train_seconds=round(result["train_seconds"], 1), seconds=round(time.perf_counter() - start, 1),
                    **reach(pipe.clip_models[0], pipe.resolution, result["sources"], result["edited"], ideal,
                            *result["prompts"]),
                )  # fmt: skip
                # the same in the second shipped CLIP (trained on off-palette colours), for measurement only
                second = reach(second_clip_pair(), pipe.resolution, result["sources"], result["edited"], ideal,
                               *result["prompts"])  # fmt: skip
                record.update({f"{k}_2": v for k, v in second.items()})
                with open(args.json, "a") as f:
                    f.write(json.dumps(record) + "\n")
                c = record["criteria"]
                print(f"{name} {pair} seed {seed} [{args.tag}]: success {record['success']:.0%} (purity "
                      f"{c.get('fraction_ok', float('nan')):.0%}), cos {record['cos']:.3f}, reach "
                      f"{record['reach']:.2f} (second CLIP: cos {record['cos_2']:.3f}, reach "
                      f"{record['reach_2']:.2f}), "
                      f"{record['train_seconds']:.0f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

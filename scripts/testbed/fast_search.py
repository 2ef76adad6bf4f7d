"""Speed against quality of fast fine-tuning / editing recipes on the shipped test-bed (EffDiff-class speed).

For each run (a fine-tuning preset, one or more edit presets, a data seed, a colour edit): fine-tune on 16 rendered
source images (data seed ``seed``), edit ``--num-test`` others (seed ``seed + 1``) exactly as
`testbed.demo.run_edit_experiment` does, and record one JSON line per edit preset in ``--out``:

- ``success`` and the rate of every criterion of `testbed.edit_success`;
- ``roundtrip_mae``: the unedited round trip, i.e. the same ``x_t0`` (same inversion / same encoding noise)
  regenerated with the same settings but ``edit_strength=0.0`` (the original UNet), mean |input - output| on the
  [0, 1] scale, over the same held-out images;
- UNet calls, counted by a forward hook: per image (sum of batch sizes / images) for the edit (encoding +
  generation) and the round trip, and for fine-tuning split into no-grad calls (the latents' inversion) and
  calls with gradients (training forwards, each with its backward);
- ``finetune_seconds``, ``edit_seconds`` (the edit alone, not the round trip), and the load average at the start.

Seeded (the data seeds; `FinetuneConfig.seed` stays 0; noise encodings draw from ``Generator().manual_seed(seed)``)
and resumable: a run whose every edit preset already has a line in ``--out`` is skipped. One torch thread.

    python scripts/testbed/fast_search.py --finetunes today one_step_noise --edits today few_4_6 --seeds 5 7
    python scripts/testbed/fast_search.py --list          # the presets
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import save_edits  # noqa: E402  (puts src/ on the path)

from diffusionclip_pipeline.testbed import RECOMMENDED_EDIT, RECOMMENDED_FINETUNE, load_pipeline, world  # noqa: E402

# fine-tuning presets: overrides on top of RECOMMENDED_FINETUNE (today's recipe is "today")
FINETUNES: dict[str, dict] = {
    "today": {},
    # EffDiff's one-step loss on DDIM-inverted latents (cheap inversion: 10 steps, no fixed point)
    "one_step_ddim10": dict(scheme="one_step", num_inversion_steps=10, num_fixed_point_iterations=0),
    # EffDiff's one-step loss on forward-noised latents (0 UNet calls to encode)
    "one_step_noise": dict(scheme="one_step", encoding="noise"),
    "one_step_noise_lr2e-3": dict(scheme="one_step", encoding="noise", learning_rate=2e-3),
    "one_step_noise_lr2e-3_b2": dict(scheme="one_step", encoding="noise", learning_rate=2e-3, batch_size=2),
    "one_step_noise_lr5e-3": dict(scheme="one_step", encoding="noise", learning_rate=5e-3),
    # a longer one-step run: a point on the speed / quality curve beyond the 1/5 budget
    "one_step_noise_e45_lr2e-3": dict(scheme="one_step", encoding="noise", num_epochs=45, learning_rate=2e-3),
    "one_step_noise_t350_lr2e-3": dict(scheme="one_step", encoding="noise", t0=350, learning_rate=2e-3),
    "one_step_noise_e20_lr1e-3_b2": dict(
        scheme="one_step", encoding="noise", num_epochs=20, learning_rate=1e-3, batch_size=2
    ),  # fmt: skip
}
# edit presets: overrides on top of RECOMMENDED_EDIT (t0 400, 32 + 32 steps)
EDITS: dict[str, dict] = {
    "today": {},
    "today_official": dict(inversion_start="official"),
    "few_4_6": dict(num_inversion_steps=4, num_inference_steps=6),
    "few_4_6_official": dict(num_inversion_steps=4, num_inference_steps=6, inversion_start="official"),
    "few_3_6": dict(num_inversion_steps=3, num_inference_steps=6),
    "few_5_5": dict(num_inversion_steps=5, num_inference_steps=5),
    "few_4_6_t350": dict(t0=350, num_inversion_steps=4, num_inference_steps=6),
    "noise_6": dict(encoding="noise", num_inference_steps=6),
    "noise_10": dict(encoding="noise", num_inference_steps=10),
    "noise_6_t350": dict(t0=350, encoding="noise", num_inference_steps=6),
}


class CallCounter:
    """Forward hook on the UNet: calls and images (sum of batch sizes), split by whether grad is enabled."""

    def __init__(self, module):
        self.reset()
        self.handle = module.register_forward_hook(self._hook)

    def reset(self):
        self.calls = {"grad": 0, "no_grad": 0}
        self.images = {"grad": 0, "no_grad": 0}

    def _hook(self, module, args, output):
        key = "grad" if torch.is_grad_enabled() else "no_grad"
        self.calls[key] += 1
        self.images[key] += int(args[0].shape[0]) if args and torch.is_tensor(args[0]) else 1

    def total_images(self):
        return self.images["grad"] + self.images["no_grad"]


def load_done(path: str) -> set:
    done = set()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    r = json.loads(line)
                    done.add((r["finetune"], r["edit_preset"], r["seed"], r["pair"], r["num_test"]))
    return done


def run(pipe, counter, ft_name, edit_names, seed, pair, num_train, num_test, out, done, save_images=None):
    source, target, shape = pair.split(":")
    todo = [e for e in edit_names if (ft_name, e, seed, pair, num_test) not in done]
    if not todo:
        print(f"skip {ft_name} {edit_names} seed {seed} {pair}: done", flush=True)
        return
    size = pipe.unet.config.sample_size
    train, _ = world.render_dataset(num_train, seed=seed, size=size, shape=shape, colour=source)
    test, _ = world.render_dataset(num_test, seed=seed + 1, size=size, shape=shape, colour=source)
    ft = {**RECOMMENDED_FINETUNE, **FINETUNES[ft_name]}
    load = os.getloadavg()[0]
    counter.reset()
    start = time.perf_counter()
    output = pipe.finetune(f"{source} {shape}", f"{target} {shape}", images=train, **ft)
    ft_s = time.perf_counter() - start
    ft_calls = dict(counter.calls)
    ft_per_image = {k: v / num_train for k, v in counter.images.items()}
    x_in = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in test])
    for e_name in todo:
        ek = {**RECOMMENDED_EDIT, **EDITS[e_name]}
        gen = (lambda: torch.Generator().manual_seed(seed)) if ek.get("encoding") == "noise" else (lambda: None)
        counter.reset()
        start = time.perf_counter()
        out_e = pipe.edit(test, output_type="pil", generator=gen(), **ek)
        edit_s = time.perf_counter() - start
        edit_calls, edit_per_image = counter.calls["no_grad"], counter.total_images() / num_test
        reports = [world.edit_success(s, e, target_colour=target) for s, e in zip(test, out_e.images)]
        criteria = [k for k in reports[0] if k.endswith("_ok")]
        if save_images:  # to score the same edits again without fine-tuning
            save_edits(save_images, f"{ft_name}-{e_name}-seed{seed}-{pair.replace(':', '-')}", test, out_e.images)
        # the unedited round trip: the same x_t0, the same generation grid, the original UNet (edit_strength 0)
        rt_kwargs = {k: v for k, v in ek.items() if k not in ("num_inversion_steps", "encoding", "inversion_start")}
        counter.reset()
        recon = pipe.edit(latents=out_e.x_t0, output_type="np", edit_strength=0.0, **rt_kwargs).images
        rt_per_image = counter.total_images() / num_test
        record = dict(
            finetune=ft_name, edit_preset=e_name, seed=seed, pair=pair, num_train=num_train, num_test=num_test,
            finetune_overrides=FINETUNES[ft_name], edit_settings=ek,
            success=float(np.mean([r["success"] for r in reports])),
            criteria={k: float(np.mean([bool(r[k]) for r in reports])) for k in criteria},
            mean_background_change=float(np.mean([r["background"] for r in reports])),
            roundtrip_mae=float(np.abs(np.asarray(recon, dtype=np.float32) - x_in).mean()),
            edit_unet_calls=edit_calls, edit_unet_calls_per_image=edit_per_image,
            roundtrip_unet_calls_per_image=rt_per_image,
            finetune_unet_calls=ft_calls, finetune_unet_images_per_train_image=ft_per_image,
            finetune_seconds=round(ft_s, 2), edit_seconds=round(edit_s, 2), loadavg_1min=round(load, 2),
            final_loss=float(output.loss_history[-1]) if output.loss_history else None,
        )  # fmt: skip
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{ft_name:32s} {e_name:18s} seed {seed} {pair:22s} success {100 * record['success']:5.1f} % "
              f"rt-MAE {record['roundtrip_mae']:.4f} edit calls/img {edit_per_image:.0f} "
              f"ft {ft_s:6.1f} s edit {edit_s:5.1f} s (load {load:.1f})", flush=True)  # fmt: skip
    pipe.delete_adapters("default")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--finetunes", nargs="+", default=["today"], choices=sorted(FINETUNES))
    p.add_argument("--edits", nargs="+", default=["today"], choices=sorted(EDITS))
    p.add_argument("--seeds", nargs="+", type=int, default=[5, 7])
    p.add_argument("--pairs", nargs="+", default=["red:blue:circle"], help="source:target:shape")
    p.add_argument("--num-train", type=int, default=16)
    p.add_argument("--num-test", type=int, default=32)
    p.add_argument("--out", default="build/fast_search.jsonl")
    p.add_argument("--save-images", metavar="DIR", help="write each edit's source and edited images (npz) to DIR")
    p.add_argument("--list", action="store_true", help="print the presets and exit")
    args = p.parse_args()
    if args.list:
        print(json.dumps({"finetunes": FINETUNES, "edits": EDITS}, indent=1, default=str))
        return
    torch.set_num_threads(1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    done = load_done(args.out)
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    counter = CallCounter(pipe.unet)
    for pair in args.pairs:
        for seed in args.seeds:
            for ft_name in args.finetunes:
                sizes = (args.num_train, args.num_test)
                run(pipe, counter, ft_name, args.edits, seed, pair, *sizes, args.out, done, args.save_images)


if __name__ == "__main__":
    main()

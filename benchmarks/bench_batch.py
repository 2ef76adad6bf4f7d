"""Throughput of batch editing (`diffusionclip_pipeline.batch.edit_images`, issue 33): images/s for 1 and 2 processes
side by side (the second under ``torchrun``, CPU gloo or one GPU each), the batch-size curve, and the share of the
editing loop's time spent outside the UNet calls (reading and decoding images, pre/post-processing, writing PNGs and
the manifest; target <= 10 % at batch 16 on the test-bed).

Each configuration is a fresh command (as a user runs it), on the test-bed UNet with a LoRA adapter attached, editing
``--images`` rendered test-bed scenes into an empty folder; images/s is measured over the editing loop (all
processes: images / the slowest process's loop time), the command's wall time (start-up and loading included) is
shown beside it. UNet time is summed by forward hooks around `pipe.unet` (synchronised on a GPU).

    python benchmarks/bench_batch.py                          # CPU: 1 vs 2 processes at batch 16, batches 1 4 16
    python benchmarks/bench_batch.py --device cuda --processes 1 --batch-sizes 1 8 32 64   # one GPU
    python benchmarks/bench_batch.py --tiny                   # smoke run (the tests' toy UNet, seconds)

``--video --lora ADAPTER`` measures video editing instead: a synthetic clip of a red circle moving across the frame,
edited three ways (the recommended DDIM-inversion edit, the fast edit with one shared noise, the fast edit with a
noise per frame), with the flicker measure (`batch.flicker`: the edit's mean frame-to-frame change minus the
source's) and the share of frames the test-bed's `edit_success` counts as red -> blue.

    python -m diffusionclip_pipeline.commands.main finetune --model testbed --src "red circle" --tar "blue circle" \
        --output build/batch_video/red2blue
    python benchmarks/bench_batch.py --video --lora build/batch_video/red2blue
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)


# ---- the worker: one process of one configuration ---------------------------------------------------------------


def _timed_unet(pipe, device: str) -> dict:
    """Forward hooks adding up the UNet's time and calls (synchronised on a GPU)."""
    import torch

    clock = {"seconds": 0.0, "calls": 0, "start": 0.0}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def before(module, args):
        sync()
        clock["start"] = time.perf_counter()

    def after(module, args, output):
        sync()
        clock["seconds"] += time.perf_counter() - clock["start"]
        clock["calls"] += 1

    pipe.unet.register_forward_pre_hook(before)
    pipe.unet.register_forward_hook(after)
    return clock


def _load(tiny: bool, device: str):
    from diffusionclip_pipeline.loaders.lora_state import LoraSettings, add_adapter

    if tiny:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "tests"))
        from conftest import make_pipeline

        pipe = make_pipeline(with_clip=False)
    else:
        from diffusionclip_pipeline.testbed import load_pipeline

        pipe = load_pipeline(second_clip=False)
    add_adapter(pipe.unet, LoraSettings(), "bench")  # edits run with an adapter, as a user's do
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def worker(args) -> None:
    from diffusionclip_pipeline.batch import edit_images, process_state

    state = process_state(cpu=args.device == "cpu")
    device = str(state.device) if args.device != "cpu" else "cpu"
    pipe = _load(args.tiny, device)
    clock = _timed_unet(pipe, device)
    result = edit_images(pipe, args.input_dir, args.output, batch_size=args.batch_size, show_progress=False,
                         **json.loads(args.settings))  # fmt: skip
    report = {"rank": result.process_index, "done": result.num_done, "seconds": result.seconds,
              "unet_seconds": clock["seconds"], "unet_calls": clock["calls"], "device": device}  # fmt: skip
    with open(f"{args.report}.rank{result.process_index}.json", "w", encoding="utf-8") as handle:
        json.dump(report, handle)


# ---- the driver ---------------------------------------------------------------------------------------------------


def render_inputs(folder: str, n: int, tiny: bool) -> None:
    from diffusionclip_pipeline.testbed import render_dataset

    os.makedirs(folder, exist_ok=True)
    images, _ = render_dataset(n, seed=0, size=16 if tiny else 32)
    for i, image in enumerate(images):
        image.save(os.path.join(folder, f"scene{i:04d}.png"))


def run_config(args, processes: int, batch_size: int, settings: dict) -> dict:
    """One fresh command of ``processes`` processes; its throughput and UNet share."""
    work = os.path.join(args.work, f"p{processes}-b{batch_size}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]  # fmt: skip
    paths = ["--input-dir", os.path.join(args.work, "in"), "--output", os.path.join(work, "out"), "--report",
             os.path.join(work, "report")]  # fmt: skip
    options = ["--batch-size", str(batch_size), "--device", args.device, "--settings", json.dumps(settings)]
    command = [*launcher, HERE, "--worker", *paths, *options, *(["--tiny"] if args.tiny else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    reports = [json.load(open(p, encoding="utf-8")) for p in sorted(glob.glob(os.path.join(work, "report.rank*")))]
    done, loop = sum(r["done"] for r in reports), max(r["seconds"] for r in reports)
    outside = sum(r["seconds"] - r["unet_seconds"] for r in reports) / sum(r["seconds"] for r in reports)
    return {"processes": processes, "batch_size": batch_size, "images": done, "loop_s": loop,
            "images_per_s": done / loop, "outside_unet": outside,
            "unet_calls_per_image": sum(r["unet_calls"] for r in reports) * batch_size / done,
            "wall_s": wall, "device": reports[0]["device"]}  # fmt: skip


def median_row(runs: list[dict]) -> dict:
    """The run of median throughput among a configuration's repeats, with the range of the throughputs."""
    ordered = sorted(runs, key=lambda r: r["images_per_s"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["range"] = (ordered[0]["images_per_s"], ordered[-1]["images_per_s"])
    return row


def table(rows: list[dict]) -> str:
    base = {r["batch_size"]: r["images_per_s"] for r in rows if r["processes"] == 1}
    lines = ["| processes | batch size | images | editing loop (s) | images/s (range) | vs 1 process | time outside "
             "UNet | command wall (s) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ratio = (
            "-"
            if r["processes"] == 1 or r["batch_size"] not in base
            else f"{r['images_per_s'] / base[r['batch_size']]:.2f}x"
        )
        low, high = r["range"]
        speed = f"{r['images_per_s']:.2f} ({low:.2f}-{high:.2f})"
        cells = [r["processes"], r["batch_size"], r["images"], f"{r['loop_s']:.1f}", speed, ratio,
                 f"{100 * r['outside_unet']:.1f} %", f"{r['wall_s']:.1f}"]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


# ---- video: flicker of the three encodings -------------------------------------------------------------------------


def moving_circle(n: int, size: int = 32) -> list:
    """A red circle (radius 6 px) moving left to right across the middle of ``n`` test-bed frames."""
    from diffusionclip_pipeline.testbed import render_shape

    return [render_shape("circle", "red", 9 + 14 * t / max(n - 1, 1), 16, 6, size=size) for t in range(n)]


def video_flicker(args) -> list[dict]:
    import PIL.Image

    from diffusionclip_pipeline.batch import edit_video, write_video
    from diffusionclip_pipeline.testbed import FAST_EDIT, RECOMMENDED_EDIT, edit_success, load_pipeline

    work = os.path.join(args.work, "video")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    frames, clip = moving_circle(args.frames), os.path.join(work, "red_circle.gif")
    write_video(frames, clip, fps=10)
    pipe = load_pipeline(second_clip=False)
    pipe.load_lora_weights(args.lora)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for name, settings, shared in (("recommended: DDIM inversion", RECOMMENDED_EDIT, True),
                                   ("fast: one shared noise", FAST_EDIT, True),
                                   ("fast: a noise per frame", FAST_EDIT, False)):  # fmt: skip
        out = os.path.join(work, name.split(":")[0] + ("" if shared else "-per-frame"))
        start = time.perf_counter()
        result = edit_video(pipe, clip, out, batch_size=16, shared_noise=shared, show_progress=False, **settings)
        seconds = time.perf_counter() - start
        edited = [PIL.Image.open(os.path.join(out, "frames", f"frame_{i:06d}.png")).convert("RGB")
                  for i in range(len(frames))]  # fmt: skip
        success = [edit_success(f, e, target_colour="blue")["success"] for f, e in zip(frames, edited)]
        rows.append({"edit": name, "frames": result.num_frames, "fps": result.fps, "source": result.source_flicker,
                     "edit_flicker": result.edit_flicker, "flicker": result.flicker,
                     "success": sum(success) / len(success), "seconds": seconds})  # fmt: skip
    print(f"a red circle moving across {args.frames} frames of 32 px at 10 fps, adapter {args.lora}:")
    print("| edit | frames | source flicker | edit flicker | flicker (edit - source) | frames red -> blue | s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['edit']} | {r['frames']} | {r['source']:.4f} | {r['edit_flicker']:.4f} | {r['flicker']:+.4f} | "
            f"{100 * r['success']:.0f} % | {r['seconds']:.1f} |"
        )
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--compare-at", type=int, default=16, help="the batch size of the process comparison")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (each process on its own GPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of each configuration, interleaved (median shown)"
    )
    parser.add_argument(
        "--recommended", action="store_true", help="the test-bed's 32 + 32-step edit, not the fast one"
    )
    parser.add_argument("--tiny", action="store_true", help="smoke run: the tests' toy UNet, 16 px, 2 steps")
    parser.add_argument("--work", default=os.path.join("build", "bench_batch"))
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--video", action="store_true", help="measure video editing (flicker) instead; needs --lora")
    parser.add_argument("--lora", default=None, help="with --video: a test-bed adapter (red -> blue circles)")
    parser.add_argument("--frames", type=int, default=16, help="with --video: frames of the clip")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--input-dir", "--output", "--report", "--settings"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.video:
        if not args.lora:
            parser.error("--video needs --lora (a test-bed red -> blue adapter: see the module's docstring)")
        return video_flicker(args)
    from diffusionclip_pipeline.testbed import FAST_EDIT, RECOMMENDED_EDIT

    settings = dict(t0=50, num_inversion_steps=2, num_inference_steps=2) if args.tiny else dict(
        RECOMMENDED_EDIT if args.recommended else FAST_EDIT)  # fmt: skip
    render_inputs(os.path.join(args.work, "in"), args.images, args.tiny)
    configs = [(p, args.compare_at) for p in args.processes]
    configs += [(1, b) for b in args.batch_sizes if (1, b) not in configs]
    runs = [run_config(args, p, b, settings) for _ in range(args.repeats) for p, b in configs]  # interleaved
    rows = [median_row([r for r in runs if (r["processes"], r["batch_size"]) == c]) for c in configs]
    print(
        f"{args.images} test-bed images, {settings}, {args.threads} thread(s) per process, {rows[0]['device']}, "
        f"median of {args.repeats} interleaved run(s):"
    )
    print(table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)
    return rows


if __name__ == "__main__":
    main()

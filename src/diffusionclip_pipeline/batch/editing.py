"""`edit_images`: a folder or list of images edited batch by batch with the pipeline's public call, across the
processes of ``accelerate launch`` / ``torchrun`` (accelerate's `PartialState.split_between_processes`), resumable
through the manifest (`batch.manifest`).

Why the work is split by batches and not by images: every batch holds the same images whatever the process count
(the inputs' fixed order cut into ``batch_size`` pieces), so an image is computed in the same company on one process
or on eight, and its output is the same file (the batch composition can change float rounding on some devices).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

from ..utils.checks import check_bool, check_non_negative_int, check_positive_int
from .inputs import BatchItem, find_inputs, item_seed
from .manifest import (
    MANIFEST_GLOB,
    ManifestShard,
    adapter_fingerprint,
    canonical,
    check_compatible,
    done_inputs,
    read_manifest,
    settings_id,
)

__all__ = ["RESERVED_EDIT_ARGUMENTS", "BatchEditOutput", "edit_images", "process_state"]

# set by `edit_images` itself, per batch
RESERVED_EDIT_ARGUMENTS = ("image", "latents", "generator", "output_type", "return_dict", "num_images_per_prompt")


@dataclass
class BatchEditOutput:
    """What one process of `edit_images` did.

    Args:
        num_inputs (`int`): Inputs of the whole run (all processes).
        num_done (`int`): Images this process edited and wrote.
        num_skipped (`int`): Inputs an earlier run had done already (all processes: none was redone).
        failures (`list[dict]`): This process's failed inputs, each ``{"input", "error"}`` (also in the manifest).
        seconds (`float`): This process's wall time in the editing loop.
        manifest (`str`): This process's manifest shard.
        process_index / num_processes (`int`): This process and how many shared the work.
    """

    num_inputs: int
    num_done: int = 0
    num_skipped: int = 0
    failures: list = field(default_factory=list)
    seconds: float = 0.0
    manifest: str = ""
    process_index: int = 0
    num_processes: int = 1

    @property
    def images_per_second(self) -> float:
        """This process's throughput (edited images per second of the editing loop)."""
        return self.num_done / self.seconds if self.seconds > 0 else 0.0


def process_state(cpu: bool | None = None):
    """accelerate's `PartialState` of this process (its index, the process count, its device), made once.

    ``cpu``: processes without an accelerator (accelerate joins ``torchrun``'s processes on the CPU, with gloo, only
    when told so); `None`: when no CUDA device is usable. Under ``accelerate launch --cpu`` it is set already.
    """
    import torch
    from accelerate import PartialState

    if cpu is None:
        cpu = not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def _items(inputs, pattern: str | None, output_dir: str) -> list[BatchItem]:
    if isinstance(inputs, (str, os.PathLike)):
        return find_inputs(input_dir=os.fspath(inputs), pattern=pattern, exclude=output_dir)
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(i, BatchItem) for i in inputs):
        if pattern is not None:
            raise ValueError(f"`pattern` {pattern!r} applies to a folder `inputs`, not to a list of `BatchItem`s.")
        return list(inputs)
    raise TypeError(f"`inputs` must be a folder or a non-empty list of `BatchItem` (`find_inputs`), got {inputs!r}.")


def _refuse_overwriting_inputs(items: list[BatchItem], output_dir: str) -> None:
    """An output path that is an input file (e.g. ``output_dir`` is the input folder) is refused, always."""
    sources = {os.path.realpath(item.source) for item in items}
    for item in items:
        path = os.path.realpath(os.path.join(output_dir, item.output))
        if path in sources:
            raise ValueError(
                f"`output_dir` {output_dir}: the edit of {item.relative} would be written to the input file {path}; "
                "choose an output folder that holds no input."
            )


def _settings(pipe, edit_kwargs: dict, more: dict) -> dict:
    """Every argument of the pipeline's call with its value here or its default (so that leaving out a default and
    passing it compare equal), and ``more``; canonical (`canonical`)."""
    import inspect

    skipped = set(RESERVED_EDIT_ARGUMENTS) | {"self", "callback_on_step_end", "callback_on_step_end_tensor_inputs"}
    parameters = inspect.signature(type(pipe).__call__).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.default is not p.empty and p.name not in skipped}
    return canonical({**defaults, **edit_kwargs, **more})


def _claim_output(state, items, output_dir: str, run: dict, overwrite: bool) -> set[str]:
    """Reads what earlier runs into ``output_dir`` did (every process reads the same), refuses mixing other settings
    or another adapter (unless ``overwrite``) and writes this process's ``run`` line. Returns the inputs done."""
    import glob

    os.makedirs(output_dir, exist_ok=True)
    if overwrite and state.is_main_process:
        for path in glob.glob(os.path.join(glob.escape(output_dir), MANIFEST_GLOB)):
            os.remove(path)
    state.wait_for_everyone()
    entries = read_manifest(output_dir)
    check_compatible(entries, run["settings"], run["adapter"], output_dir)
    if not entries and not overwrite:  # a folder that no run of ours wrote: refuse its files, as the CLI does
        existing = [item.output for item in items if os.path.lexists(os.path.join(output_dir, item.output))]
        if existing:
            raise ValueError(
                f"`output_dir` {output_dir}: {len(existing)} output(s) exist already (e.g. {existing[0]}) and no "
                "manifest accounts for: pass `overwrite=True` (--overwrite) or choose another folder."
            )
    state.wait_for_everyone()  # every process has read the manifest before any writes to it
    ManifestShard(output_dir, state.process_index).append([{**run, "run": True, "rank": state.process_index}])
    return done_inputs(entries)


def _progress(total: int, desc: str, enabled: bool):
    """tqdm on a terminal, log lines otherwise (`utils.logging.LogProgress`), nothing when not ``enabled``."""
    from ..utils.logging import LogProgress

    if not enabled:
        return LogProgress(total=0, desc=desc)  # total 0: it never prints
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="img", file=sys.stderr)
    return LogProgress(total=total, desc=desc)


def _read(item: BatchItem):
    """The image (decoded now, when its batch comes) and the information it lost, or the `OSError`."""
    from ..image_io import read_image

    lost: list[str] = []
    try:
        return read_image(item.source, on_loss=lost.append), lost
    except OSError as error:
        return error, lost


def _edit(pipe, images: list, seeds: list[int], edit_kwargs: dict) -> list:
    """The edits of ``images``; if the batch fails, each image alone, so one bad image fails only itself."""
    import torch

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    try:
        return list(pipe(images, generator=generators, output_type="pil", **edit_kwargs).images)
    except (ValueError, RuntimeError, TypeError) as error:
        if len(images) == 1:
            return [error]
    return [_edit(pipe, [image], [s], edit_kwargs)[0] for image, s in zip(images, seeds)]


def _edit_batch(pipe, batch: list[BatchItem], output_dir: str, run: dict, edit_kwargs: dict) -> list[dict]:
    """Edits one batch and writes each output atomically; returns the batch's manifest lines."""
    from ..image_io import save_atomic

    start = time.perf_counter()
    base = {"settings_id": run["settings_id"], "adapter": run["adapter"], "rank": run["rank"]}
    entries, readable, images, notes = {}, [], [], {}
    for item in batch:
        image, lost = _read(item)
        notes[item.relative] = lost
        if isinstance(image, OSError):
            entries[item.relative] = {"status": "failed", "error": str(image)}
        else:
            readable.append(item)
            images.append(image)
    seed = run["settings"]["seed"]
    shared = run["settings"]["shared_noise"]
    seeds = [seed if shared else item_seed(seed, item.relative) for item in readable]
    for item, result in zip(readable, _edit(pipe, images, seeds, edit_kwargs) if images else []):
        if isinstance(result, Exception):
            entries[item.relative] = {"status": "failed", "error": f"{type(result).__name__}: {result}"}
            continue
        path = os.path.join(output_dir, item.output)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_atomic(result, path)
        entries[item.relative] = {"status": "done"}
    seconds = (time.perf_counter() - start) / len(batch)
    return [
        {"input": item.relative, "output": item.output, **entries[item.relative], "seconds": round(seconds, 4),
         **({"warnings": notes[item.relative]} if notes[item.relative] else {}), **base}
        for item in batch
    ]  # fmt: skip


def edit_images(
    pipe,
    inputs,
    output_dir: str,
    batch_size: int = 8,
    seed: int = 0,
    overwrite: bool = False,
    pattern: str | None = None,
    shared_noise: bool = False,
    show_progress: bool = True,
    run_info: dict | None = None,
    **edit_kwargs,
) -> BatchEditOutput:
    r"""
    Edits every image of ``inputs`` with ``pipe`` (its public call, `DiffusionCLIPPipeline.edit`) and writes each edit
    to ``output_dir`` at the input's relative path (as PNG), batch by batch: an image is decoded only when its batch
    comes. Run under ``accelerate launch`` or ``torchrun``, each process edits its share of the batches
    (accelerate's `PartialState.split_between_processes`); every input is edited exactly once, with the same result
    as in one process. A manifest in ``output_dir`` (`batch.manifest`) records each input's status, so a run that was
    killed, started again with the same arguments, skips what is done and redoes nothing that was half written.

    Args:
        pipe (`DiffusionCLIPPipeline`): The pipeline, on this process's device, its adapters loaded and active.
        inputs (`str` or `list[BatchItem]`): A folder (searched recursively; see ``pattern``) or the items of
            `find_inputs` (e.g. of a list file).
        output_dir (`str`): The output folder (created if missing). It never overwrites an input file.
        batch_size (`int`, *optional*, defaults to 8): Images edited at once.
        seed (`int`, *optional*, defaults to 0): The run's seed. With ``encoding="noise"`` or ``eta > 0`` each
            image's noise is seeded from it and the image's relative path (`item_seed`): the same for any sharding.
        overwrite (`bool`, *optional*, defaults to `False`): Redo everything, replacing the outputs and the manifest
            of an earlier run (without it, a run with other settings or another adapter into the same folder is
            refused, and so are existing files that no manifest accounts for).
        pattern (`str`, *optional*): A glob the relative paths (or, without ``/``, the file names) of a folder's
            images must match, e.g. ``"*.jpg"`` (default: every file ending in an image suffix).
        shared_noise (`bool`, *optional*, defaults to `False`): Seed every image's noise with ``seed`` itself (a
            video's frames share one encoding noise).
        show_progress (`bool`, *optional*, defaults to `True`): A progress bar on stderr (tqdm on a terminal, one
            log line per 10 % otherwise), images/s and time left, on each machine's first process.
        run_info (`dict`, *optional*): More settings to record and compare (e.g. the video the frames come from).
        **edit_kwargs: `DiffusionCLIPPipeline.edit` arguments (``t0``, ``num_inference_steps``, ``encoding``,
            ``edit_strength``, ...); those in `RESERVED_EDIT_ARGUMENTS` are set here.

    Returns:
        [`BatchEditOutput`]: this process's counts, failures, time and manifest shard.

    Examples:

    ```py
    >>> from diffusionclip_pipeline.batch import edit_images
    >>> result = edit_images(pipe, "photos/", "edited/", batch_size=16, t0=400, num_inference_steps=32)
    >>> result.num_done, result.failures, f"{result.images_per_second:.1f} images/s"
    ```
    """
    # 1. Check inputs, before any work
    output_dir = os.fspath(output_dir)
    items = _items(inputs, pattern, output_dir)
    check_positive_int(batch_size, "batch_size")
    check_non_negative_int(seed, "seed")
    check_bool(overwrite, "overwrite")
    check_bool(shared_noise, "shared_noise")
    if reserved := sorted(set(edit_kwargs) & set(RESERVED_EDIT_ARGUMENTS)):
        raise ValueError(f"`edit_images` sets {reserved} itself; got them in `edit_kwargs`.")
    _refuse_overwriting_inputs(items, output_dir)
    state = process_state(cpu=pipe.device.type == "cpu")
    settings = _settings(pipe, edit_kwargs, {**(run_info or {}), "seed": seed, "shared_noise": shared_noise})
    run = {"settings": settings, "settings_id": settings_id(settings), "adapter": adapter_fingerprint(pipe),
           "rank": state.process_index}  # fmt: skip
    # 2. What earlier runs did; the batches left, split between the processes
    done = _claim_output(state, items, output_dir, run, overwrite)
    batches = [
        [i for i in items[k : k + batch_size] if i.relative not in done] for k in range(0, len(items), batch_size)
    ]
    with state.split_between_processes([b for b in batches if b]) as mine:
        mine = list(mine)
    # 3. Edit batch by batch; a batch's manifest lines are appended once its outputs are in place
    output = BatchEditOutput(len(items), num_skipped=len(done & {i.relative for i in items}),
                             process_index=state.process_index, num_processes=state.num_processes)  # fmt: skip
    shard = ManifestShard(output_dir, state.process_index)
    output.manifest = shard.path
    _run_batches(
        pipe, mine, output_dir, run, edit_kwargs, shard, output, show_progress and state.is_local_main_process
    )
    return output  # no barrier here: a process that is done need not wait (hours, on uneven machines) for the rest


def _run_batches(pipe, batches, output_dir, run, edit_kwargs, shard, output: BatchEditOutput, show: bool) -> None:
    who = f" (process {output.process_index} of {output.num_processes})" if output.num_processes > 1 else ""
    bar = _progress(sum(len(b) for b in batches), f"editing{who}", show)
    start = time.perf_counter()
    try:
        for batch in batches:
            entries = _edit_batch(pipe, batch, output_dir, run, edit_kwargs)
            shard.append(entries)
            output.num_done += sum(e["status"] == "done" for e in entries)
            output.failures += [{"input": e["input"], "error": e["error"]} for e in entries if e["status"] == "failed"]
            output.seconds = time.perf_counter() - start
            bar.set_postfix({"images/s": f"{output.images_per_second:.2f}", "failed": len(output.failures)})
            bar.update(len(batch))
    finally:
        bar.close()
        output.seconds = time.perf_counter() - start

"""Resumable fine-tuning: checkpoints of a `finetune` run, written atomically and read back validated.

A checkpoint (``checkpoint_dir/checkpoint-latest/``) holds the adapter (``pytorch_lora_weights.safetensors``), the
optimizer's tensors, the random states, and ``trainer_state.json`` (counters, loss history, the optimizer's other
state, the `GradScaler`'s, the settings and fingerprints, every file's SHA-256): safetensors and JSON only, never
pickle. `finetune` writes one every ``checkpoint_every`` optimizer steps and resumes from one bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load_file, save_file

from .._version import __version__
from ..loaders import lora_file
from ..loaders.lora_file import LORA_WEIGHT_NAME, weights_fingerprint
from ..utils.checks import check_int, check_non_negative_int, check_number, check_positive_int, short_repr
from ..utils.io import atomic_directory
from .data import tensor_bytes
from .losses import FinetuneLoss

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_VERSION",
    "CHECKPOINT_NAME",
    "OPTIMIZER_NAME",
    "RANDOM_STATES_NAME",
    "TRAINER_STATE_NAME",
    "Checkpoint",
    "Checkpointer",
    "RunSettings",
    "check_checkpointing",
    "read_checkpoint",
]

# ---- checkpoints ---------------------------------------------------------------------------------------------

CHECKPOINT_NAME = "checkpoint-latest"
TRAINER_STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
RANDOM_STATES_NAME = "random_states.safetensors"
_FILES = (LORA_WEIGHT_NAME, OPTIMIZER_NAME, RANDOM_STATES_NAME)
CHECKPOINT_FORMAT = "diffusionclip-finetune-checkpoint"
CHECKPOINT_FORMAT_VERSION = 2  # 2: trainer_state.json carries its own checksum
MAX_STATE_BYTES = 64 * 2**20  # trainer_state.json: a loss history of a million steps is about 20 MB
MAX_CLIP_MODELS = 8
_MAX_COUNT = 2**53  # counters: exact in a JSON number


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_tensors(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for x in tensors:
        digest.update(f"{tuple(x.shape)}|{x.dtype}|".encode())
        digest.update(tensor_bytes(x))
    return digest.hexdigest()


def _state_checksum(state: dict) -> str:
    """SHA-256 of ``state`` (all but its ``checksum``) as canonical JSON: with the files' checksums it lists, it
    covers every value of the checkpoint."""
    rest = {k: v for k, v in state.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _is_hex_digest(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _check_state_fields(state: dict) -> None:
    """Every field of a checksummed ``trainer_state.json`` has the type and range a run writes (`ValueError`/
    `TypeError` naming it), before any is used: an edited or crafted file cannot make the reader allocate, loop or
    resume with values no run produces."""
    for key in ("epoch", "batch", "num_updates", "accelerator_step"):
        check_int(state[key], f"{TRAINER_STATE_NAME} {key}", minimum=0, maximum=_MAX_COUNT)
    settings, history = state["settings"], state["loss_history"]
    if not isinstance(settings, dict) or not isinstance(history, list):
        raise TypeError("`settings` must be an object and `loss_history` a list")
    for i, loss in enumerate(history):
        check_number(loss, f"{TRAINER_STATE_NAME} loss_history[{i}]")
    check_int(settings["num_clip_models"], f"{TRAINER_STATE_NAME} num_clip_models", minimum=1, maximum=MAX_CLIP_MODELS)
    if isinstance(settings.get("num_epochs"), int) and state["epoch"] > settings["num_epochs"]:
        raise ValueError(f"epoch {state['epoch']} is past the run's num_epochs {settings['num_epochs']}")
    optimizer, scaler = state["optimizer"], state["grad_scaler"]
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("param_groups"), list)
            and all(isinstance(g, dict) for g in optimizer["param_groups"])
            and isinstance(optimizer.get("state"), dict)
            and all(isinstance(v, dict) for v in optimizer["state"].values())):  # fmt: skip
        raise TypeError("`optimizer` must hold a list of param groups and a state object")
    if scaler is not None and not isinstance(scaler, dict):
        raise TypeError(f"`grad_scaler` must be an object or null, got {short_repr(scaler)}")
    files = state["files"]
    if not isinstance(files, dict) or not all(_is_hex_digest(files.get(n)) for n in _FILES):
        raise ValueError("`files` must list a SHA-256 for each file")


def _read_state(state_path: str) -> dict:
    """``trainer_state.json``: bounded in size and depth, of this format and version, its checksum verified, its
    fields validated."""
    if os.path.getsize(state_path) > MAX_STATE_BYTES:
        raise ValueError(f"{TRAINER_STATE_NAME} is larger than {MAX_STATE_BYTES} bytes")
    try:
        with open(state_path, encoding="utf-8") as handle:
            state = json.load(handle)
    except RecursionError:
        raise ValueError(f"{TRAINER_STATE_NAME} is nested too deeply") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a {CHECKPOINT_FORMAT}")
    if state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(f"format version {state.get('format_version')!r}, expected {CHECKPOINT_FORMAT_VERSION}")
    if state.get("checksum") != _state_checksum(state):
        raise ValueError(f"{TRAINER_STATE_NAME} does not match its checksum (edited or corrupt)")
    _check_state_fields(state)
    return state


def check_checkpointing(checkpoint_dir, checkpoint_every, resume_from) -> None:
    """`finetune`'s ``checkpoint_dir``, ``checkpoint_every`` and ``resume_from`` (see there), before any work."""
    for name, value in (("checkpoint_dir", checkpoint_dir), ("resume_from", resume_from)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"`{name}` must be a folder path (str or os.PathLike), got {short_repr(value)}.")
    if checkpoint_every is not None:
        check_positive_int(checkpoint_every, "checkpoint_every")
    if checkpoint_dir is not None and checkpoint_every is None:
        raise ValueError("`checkpoint_dir` needs `checkpoint_every` (optimizer steps between checkpoints).")
    if checkpoint_every is not None and checkpoint_dir is None:
        raise ValueError(f"`checkpoint_every`={checkpoint_every} needs a `checkpoint_dir` to write to.")
    if checkpoint_dir is not None and os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
        raise ValueError(f"`checkpoint_dir` {os.fspath(checkpoint_dir)!r} exists and is not a folder.")
    if resume_from is not None and not os.path.isdir(resume_from):
        raise ValueError(f"`resume_from` {os.fspath(resume_from)!r} is not a folder (a checkpoint to resume from).")


def _jsonable(value):
    return json.loads(json.dumps(value))


def _config_settings(config, prompt_src: str, prompt_tar: str) -> dict:
    """The settings known before any work: every `FinetuneConfig` field and the prompts."""
    return _jsonable({**asdict(config), "prompt_src": prompt_src, "prompt_tar": prompt_tar})


def _model_settings(pipe) -> dict:
    """The identity of the base UNet (config and weights, adapters excluded), the noise schedule and, for a latent
    model, the autoencoder."""
    scheduler = json.dumps(
        {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}, sort_keys=True, default=str
    )
    settings = {
        "base_unet": weights_fingerprint(pipe.denoiser),
        "scheduler": hashlib.sha256(scheduler.encode()).hexdigest(),
    }
    if pipe.autoencoder is not None:  # a latent model: its autoencoder too (pixel models' checkpoints unchanged)
        settings["autoencoder"] = weights_fingerprint(pipe.autoencoder)
    return settings


def _data_settings(loss_fn, x0: torch.Tensor, x_t0: torch.Tensor) -> dict:
    """Fingerprints of the training images, their latents and the CLIP direction(s) (prompts or direction images,
    in each CLIP's space: a change of CLIP model changes them too)."""
    return {
        "num_clip_models": len(loss_fn.clip_losses),
        "direction": _sha256_tensors(*loss_fn.directions),
        "training_images": _sha256_tensors(x0),
        "latents": _sha256_tensors(x_t0),
    }


def _check_settings(saved: dict, current: dict, path: str) -> None:
    """`ValueError` naming every setting in ``current`` that differs from the checkpoint's."""
    differ = [key for key in current if key not in saved or saved[key] != current[key]]
    if differ:
        shown = ", ".join(
            f"`{k}` (checkpoint: {short_repr(saved.get(k), 60)}, now: {short_repr(current[k], 60)})" for k in differ
        )
        raise ValueError(
            f"Cannot resume from {path!r}: these settings differ from the checkpoint's: {shown}. Resume with the "
            "settings, prompts, images and base model of the interrupted run."
        )


class RunSettings:
    """What a checkpoint records of its run, and what a resumed run must match: the settings and fingerprints
    (`_config_settings`, `_model_settings`, `_data_settings`), gathered in stages as the run gets to know them. Each
    stage is checked against the checkpoint being resumed at once, before the work that depends on it; without
    checkpoints nothing is gathered (the fingerprints hash every weight)."""

    def __init__(self, needed: bool, resume: Checkpoint | None = None):
        self.values: dict | None = {} if needed or resume is not None else None
        self.resume = resume

    def add(self, compute: Callable[[], dict]) -> None:
        """Adds ``compute()`` (only if settings are gathered) and checks everything so far against the checkpoint."""
        if self.values is None:
            return
        self.values.update(compute())
        if self.resume is not None:
            _check_settings(self.resume.settings, self.values, self.resume.path)


@dataclass
class Checkpoint:
    """A fine-tuning checkpoint read back by `read_checkpoint` (validated: complete, checksums match).

    Args:
        path (`str`): Its folder.
        epoch (`int`) / batch (`int`): Where training continues: batch ``batch`` of epoch ``epoch``.
        num_updates (`int`): Optimizer steps done.
        loss_history (`list[float]`): The losses so far.
        settings (`dict`): The run's settings and fingerprints (see `finetune`).
        adapter (`dict[str, torch.Tensor]`): The adapter's weights (peft keys).
        optimizer_tensors (`dict[str, torch.Tensor]`) / trainer_state (`dict`): For `TrainStep.load_state`.
        random_states (`dict[str, torch.Tensor]`): The generator states.
    """

    path: str
    epoch: int
    batch: int
    num_updates: int
    loss_history: list[float]
    settings: dict
    adapter: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor]
    trainer_state: dict
    random_states: dict[str, torch.Tensor]

    def restore(self, trainer, generator: torch.Generator, loss_fn: FinetuneLoss) -> None:
        """Optimizer, scaler, counters and every random state as they were when the checkpoint was written (the
        shuffling generator as it was at the start of ``epoch``, to redraw that epoch's order)."""
        trainer.load_state(self.optimizer_tensors, self.trainer_state)
        generator.set_state(self.random_states["shuffle"])
        loss_fn.set_random_states(self.random_states)
        torch.set_rng_state(self.random_states["torch"])
        if trainer.device.type == "cuda" and "torch_cuda" in self.random_states:  # absent if written elsewhere
            torch.cuda.set_rng_state(self.random_states["torch_cuda"], trainer.device)

    def load_adapter_weights(self, unet, adapter_name: str) -> None:
        """Copies the checkpoint's adapter weights into the fresh adapter ``adapter_name`` (same keys and shapes)."""
        params = _adapter_parameters_by_key(unet, adapter_name)
        if params.keys() != self.adapter.keys():
            missing, unexpected = (
                sorted(params.keys() - self.adapter.keys()),
                sorted(self.adapter.keys() - params.keys()),
            )
            raise ValueError(
                f"The adapter in {self.path!r} does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}."
            )
        with torch.no_grad():
            for key, p in params.items():
                if p.shape != self.adapter[key].shape:
                    raise ValueError(
                        f"The adapter in {self.path!r} does not fit: {key} has shape "
                        f"{tuple(self.adapter[key].shape)}, expected {tuple(p.shape)}."
                    )
                p.copy_(self.adapter[key])


def _adapter_parameters_by_key(unet, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters under peft's state-dict keys (``<module>.lora_A.weight``: the adapter name dropped)."""
    params = {}
    for part in ("A", "B"):
        suffix = f".lora_{part}.{adapter_name}.weight"
        for name, p in unet.named_parameters():
            if name.endswith(suffix):
                params[f"{name[: -len(suffix)]}.lora_{part}.weight"] = p
    return params


def _resolve_checkpoint(path) -> str:
    """``path`` itself, or its ``checkpoint-latest`` (a `checkpoint_dir` may be given to `resume_from`)."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)) and os.path.isfile(
        os.path.join(path, CHECKPOINT_NAME, TRAINER_STATE_NAME)
    ):
        return os.path.join(path, CHECKPOINT_NAME)
    return path


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Reads and validates a checkpoint folder written by `finetune` (or a ``checkpoint_dir`` holding one).

    Safetensors and JSON only (never pickle). ``trainer_state.json`` (written last) carries its own SHA-256 and every
    other file's, and each of its fields is checked for type and range before use; a missing, truncated, corrupt or
    edited file, or a checkpoint of another format, raises `ValueError`.
    """
    path = _resolve_checkpoint(path)
    state_path = os.path.join(path, TRAINER_STATE_NAME)
    if not os.path.isfile(state_path):
        raise ValueError(f"`resume_from` {path!r} is not a fine-tuning checkpoint (no {TRAINER_STATE_NAME}).")
    try:
        state = _read_state(state_path)
        for name in _FILES:
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                raise ValueError(f"{name} is missing")
            if _sha256_file(file) != state["files"][name]:
                raise ValueError(f"{name} does not match its checksum (truncated or corrupt)")
        adapter = lora_file.read_adapter_file(os.path.join(path, LORA_WEIGHT_NAME)).state_dict
        optimizer_tensors = load_file(os.path.join(path, OPTIMIZER_NAME))
        random_states = load_file(os.path.join(path, RANDOM_STATES_NAME))
        trainer_state = {k: state[k] for k in ("optimizer", "grad_scaler", "num_updates", "accelerator_step")}
        checkpoint = Checkpoint(
            path=path, epoch=check_non_negative_int(state["epoch"], "epoch"),
            batch=check_non_negative_int(state["batch"], "batch"),
            num_updates=check_non_negative_int(state["num_updates"], "num_updates"),
            loss_history=[float(v) for v in state["loss_history"]], settings=dict(state["settings"]),
            adapter={k: v.clone() for k, v in adapter.items()}, optimizer_tensors=optimizer_tensors,
            trainer_state=trainer_state, random_states=random_states,
        )  # fmt: skip
        needed = ["shuffle", "torch"] + [f"clip_augment.{i}" for i in range(int(state["settings"]["num_clip_models"]))]
        missing = [key for key in needed if key not in random_states]
        if missing:
            raise ValueError(f"no random state {missing}")
    except (OSError, KeyError, TypeError, AttributeError, ValueError) as error:  # JSONDecodeError: a ValueError
        raise ValueError(f"The checkpoint at {path!r} is unreadable or incomplete: {error}") from error
    return checkpoint


@dataclass
class Checkpointer:
    """Writes ``<checkpoint_dir>/checkpoint-latest`` every ``every`` optimizer steps, at a batch end with no
    gradients pending, replacing the previous one atomically."""

    checkpoint_dir: str
    every: int
    unet: object
    adapter_name: str
    settings: dict
    last: int = 0  # `num_updates` at the last checkpoint

    def due(self, trainer) -> bool:
        return trainer.num_updates - self.last >= self.every and not trainer.pending_gradients

    def write(self, trainer, loss_fn: FinetuneLoss, epoch: int, batch: int, shuffle_state, loss_history):
        optimizer_tensors, trainer_state = trainer.state()
        random_states = {"shuffle": shuffle_state, "torch": torch.get_rng_state(), **loss_fn.random_states()}
        if trainer.device.type == "cuda":
            random_states["torch_cuda"] = torch.cuda.get_rng_state(trainer.device)
        with atomic_directory(os.path.join(self.checkpoint_dir, CHECKPOINT_NAME)) as tmp:
            lora_file.save_adapter(self.unet, tmp, self.adapter_name)
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in optimizer_tensors.items()},
                os.path.join(tmp, OPTIMIZER_NAME),
                metadata={"format": "pt"},
            )
            save_file(random_states, os.path.join(tmp, RANDOM_STATES_NAME), metadata={"format": "pt"})
            files = {name: _sha256_file(os.path.join(tmp, name)) for name in _FILES}
            state = {
                "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION,
                "package_version": __version__, "epoch": epoch, "batch": batch, **trainer_state,
                "loss_history": loss_history, "settings": self.settings, "files": files,
            }  # fmt: skip
            state["checksum"] = _state_checksum(_jsonable(state))  # of the values as they read back
            with open(os.path.join(tmp, TRAINER_STATE_NAME), "w", encoding="utf-8") as handle:
                json.dump(state, handle, indent=1)
        self.last = trainer.num_updates

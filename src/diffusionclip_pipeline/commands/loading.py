"""Everything checked before any work, and the loading itself: the device, the output folder, the input files,
``--model`` / ``--clip`` / ``--clip-2`` (a registered name, a folder, or a hub id, probed quickly when the hub is
offline or unreachable), the CPU threads, then the pipeline, its adapters and its CLIP, each failure one `CLIError`."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import tempfile

from .errors import CLIError, one_line
from .registry import PLUGIN_GROUP, RegisteredModel, registered_models

__all__ = [
    "check_adapters",
    "check_before_editing",
    "check_device",
    "check_model",
    "check_output",
    "check_source",
    "ensure_clip",
    "load_adapters",
    "load_pipeline",
    "read_inputs",
    "set_num_threads",
    "set_threads_for",
]

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# ---- the device, the output folder, the inputs ----------------------------------------------------------------


def check_device(device: str | None) -> None:
    """Raises `CLIError` unless ``device`` (``--device``; `None`: the CPU) names a device this torch can use."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise CLIError(f"unknown device {device!r} (--device): use e.g. cpu, cuda, cuda:1 or mps") from None
    if parsed.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise CLIError(
                f"--device {device}: this torch build has no CUDA (torch {torch.__version__}); install a CUDA build "
                "of torch (https://pytorch.org/get-started/locally/), or leave out --device to run on the CPU"
            )
        if not torch.cuda.is_available():
            raise CLIError(f"--device {device}: this torch has CUDA, but no GPU is usable (is the driver loaded?)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise CLIError(f"--device {device}: there are only {torch.cuda.device_count()} GPU(s) (cuda:0 ...)")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise CLIError(f"--device {device}: MPS (Apple GPU) is not available in this torch or on this machine")
    elif parsed.type == "meta":
        raise CLIError(f"--device {device}: the meta device holds no data; use e.g. cpu or cuda")
    elif parsed.type != "cpu":
        try:
            torch.empty(1, device=parsed)
        except (RuntimeError, AssertionError) as error:
            raise CLIError(f"--device {device} is not usable here: {one_line(error)}") from None


def check_output(path: str, option: str = "--output") -> None:
    """Raises `CLIError` unless ``path`` is a folder that can be written, or can be created (nothing is created)."""
    full = os.path.abspath(path)
    if os.path.exists(full) and not os.path.isdir(full):
        raise CLIError(f"{option} {path}: exists and is not a folder")
    existing = full
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CLIError(f"{option} {path}: cannot create it inside {existing}, which is not a folder")
    try:  # os.access says yes to root even on /proc: try for real
        fd, probe = tempfile.mkstemp(prefix=".diffusionclip-write-test-", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        where = "" if existing == full else f" (cannot create files in {existing})"
        raise CLIError(f"{option} {path}: not writable{where}: {error.strerror or error}") from None


def read_inputs(paths: list[str], option: str = "--images") -> tuple[list, list[str]]:
    """The images (RGB PIL) and their files; every file is read and checked here."""
    from ..image_io import find_images, read_image

    try:
        files = find_images(paths)
    except (OSError, ValueError) as error:
        raise CLIError(f"{option}: {error}") from None
    return [read_image(f) for f in files], files


def check_adapters(paths: list[str] | None, weights: list[float] | None) -> None:
    """Every ``--lora`` path exists, and ``--lora-weights`` (if given) has one weight per adapter."""
    for path in paths or []:
        if not os.path.exists(path):
            raise CLIError(f"--lora {path}: no such adapter file or folder")
    if weights and len(weights) != len(paths or []):
        raise CLIError(f"--lora-weights has {len(weights)} values for {len(paths or [])} --lora adapters")


def set_num_threads(threads: int | None = None, recommended: int | None = None) -> int:
    """`utils.logging.set_num_threads`, a bad ``OMP_NUM_THREADS`` as a `CLIError`."""
    from ..utils.logging import set_num_threads as set_threads

    try:
        return set_threads(threads, recommended)
    except ValueError as error:
        raise CLIError(str(error)) from error


# ---- where the models come from ---------------------------------------------------------------------------------


def truthy(value: str | None) -> bool:
    """An environment variable's value as a flag (``1``, ``on``, ``yes``, ``true``)."""
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as huggingface_hub reads it; also when set after it loaded."""
    if truthy(os.environ.get("HF_HUB_OFFLINE")) or truthy(os.environ.get("TRANSFORMERS_OFFLINE")):
        return True
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model_index.json", "config.json", "unet/config.json"):
        if isinstance(try_to_load_from_cache(repo_id, filename), str):
            return True
    return False


@functools.lru_cache(maxsize=1)
def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub's host cannot be reached (a DNS lookup and a TCP connect, ``timeout`` seconds), or `None`.

    huggingface_hub retries a failed request 5 times with back-off (about a minute without a network), so the CLI
    asks once, quickly. Behind a proxy it does not ask (the direct connection would fail where the proxy works).
    """
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as error:
        return f"{host}:{port}: {error.strerror or error}"


def _local_folder_hint(option: str) -> str:
    return f"pass a local folder instead ({option} /path/to/folder)"


def _check_hub_source(option: str, name: str) -> bool:
    """For a hub id: fails at once when the hub is offline or unreachable and ``name`` is not cached. Returns whether
    to load from the local cache only."""
    if _hub_offline():
        if _in_hub_cache(name):
            return True
        raise CLIError(
            f"{option} {name}: the hub is offline (HF_HUB_OFFLINE is set) and {name} is not in the local cache: "
            f"{_local_folder_hint(option)}, or unset HF_HUB_OFFLINE"
        )
    why = _hub_unreachable()
    if why is None:
        return False
    if _in_hub_cache(name):
        print(f"diffusionclip: the hub cannot be reached ({why}): using the cached {name}", file=sys.stderr)
        return True
    raise CLIError(f"{option} {name}: the hub cannot be reached ({why}) and {name} is not cached: "
                   f"{_local_folder_hint(option)}")  # fmt: skip


def check_source(option: str, name: str | None) -> bool:
    """``name`` (of ``--clip`` / ``--clip-2`` / an unregistered ``--model``) is a folder or a reachable hub id;
    returns whether to load it from the local cache only."""
    if name is None or os.path.isdir(name):
        return False
    if os.path.exists(name):
        raise CLIError(f"{option} {name}: is a file; pass a folder or a hub id owner/name")
    if not HUB_ID.fullmatch(name):
        raise CLIError(f"{option} {name}: no such folder, and not a hub id owner/name")
    return _check_hub_source(option, name)


def check_model(model: str, clip: str | None = None) -> RegisteredModel | None:
    """``--model`` (and ``--clip``) can be loaded; returns the registered model, if ``model`` names one."""
    models = registered_models()
    registered = models.get(model)
    if registered is not None:
        if clip:
            raise CLIError(f"--clip does not apply to --model {model}: it brings its own CLIP")
        return registered
    if not os.path.exists(model) and not HUB_ID.fullmatch(model):
        known = ", ".join(models) or f"none; plugins are the '{PLUGIN_GROUP}' entry points"
        raise CLIError(f"unknown model {model!r}: not a registered model (registered: {known}), a folder, or a "
                       "hub id owner/name")  # fmt: skip
    check_source("--model", model)
    check_source("--clip", clip)
    return None


def check_before_editing(args, lora_weights: list[float] | None = None, clip_2: str | None = None):
    """What ``edit``, ``sweep`` and ``translate`` check before any work, in this order: the images, the adapters
    (and ``lora_weights``), the output folder, the model and its CLIP (and ``clip_2``), the device. Returns the
    images, their files and the registered model (`None` for a folder or hub id)."""
    images, files = read_inputs(args.images)
    check_adapters(args.lora, lora_weights)
    check_output(args.output)
    registered = check_model(args.model, args.clip)
    check_timesteps_of_folder(args)
    check_source("--clip-2", clip_2)
    check_device(args.device)
    return images, files, registered


def check_timesteps_of_folder(args) -> None:
    """``--t0`` (and ``--edit-t0``) against a local ``--model`` folder's ``num_train_timesteps``, read from its
    scheduler config before the model loads (for a registered model or a hub id the pipeline checks it on load)."""
    config = os.path.join(args.model, "scheduler", "scheduler_config.json")
    if not os.path.isfile(config):
        return
    try:
        with open(config, encoding="utf-8") as handle:
            num_train_timesteps = int(json.load(handle).get("num_train_timesteps", 1000))
    except (OSError, ValueError, TypeError, AttributeError, RecursionError):
        return  # the load reports an unreadable config in its own words
    for option in ("t0", "edit_t0"):
        values = getattr(args, option, None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and not 1 <= value < num_train_timesteps:
                name = "--" + option.replace("_", "-")
                raise CLIError(f"{name} must be an integer in [1, {num_train_timesteps - 1}] for --model "
                               f"{args.model}, got {value}")  # fmt: skip


def set_threads_for(args, registered: RegisteredModel | None) -> int:
    """`set_num_threads` with ``--threads`` and the registered model's recommendation."""
    return set_num_threads(args.threads, registered.num_threads if registered else None)


# ---- loading ----------------------------------------------------------------------------------------------------


def _hub_error(option: str, name: str, error: BaseException) -> CLIError:
    """One line for a failed hub load: unreachable, not found, or else (diffusers cites "the stacktrace above")."""
    chain, seen = [], error
    while seen is not None and len(chain) < 10:
        chain.append(type(seen).__name__)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(chain) + " " + str(error)
    if "RepositoryNotFound" in text or "RevisionNotFound" in text or "404" in text:
        return CLIError(f"{option} {name}: no such model on the hub (or it is private or gated: log in with `hf auth "
                        f"login`); or {_local_folder_hint(option)}")  # fmt: skip
    if re.search(r"connect|offline|timed? ?out|resolve|network|LocalEntryNotFound|fetch metadata", text, re.I):
        return CLIError(f"{option} {name}: the hub could not be reached, and {name} is not fully cached: "
                        f"{_local_folder_hint(option)}")  # fmt: skip
    return CLIError(f"cannot load {option} {name}: {one_line(error)}")


def _load_error(option: str, name: str, error: BaseException, shown: str | None = None) -> CLIError:
    """A folder's load error as it is (``shown``: how to name the folder), a hub id's through `_hub_error`."""
    if os.path.isdir(name):
        return CLIError(f"cannot load {option} {shown or name}: {one_line(error)}")
    return _hub_error(option, name, error)


def load_pipeline(model: str, clip: str | None = None, device: str | None = None, clip_2: str | None = None):
    """A `DiffusionCLIPPipeline` from a registered model name, a folder or a hub id; ``clip_2`` sets a second CLIP.

    Every failure is a `CLIError` of one line: an unknown model, an offline or unreachable hub (at once, when the
    model is not cached), a folder that is not a pipeline, a malformed ``lora/adapters.json``, an unusable device.
    """
    from ..utils.logging import quiet_loading

    registered = check_model(model, clip)
    local_2 = check_source("--clip-2", clip_2)
    check_device(device)
    with quiet_loading():
        if registered is not None:
            pipe = registered.load()
        else:
            from .. import DiffusionCLIPPipeline

            kwargs = {"local_files_only": True} if check_source("--model", model) else {}  # only the cache
            try:
                pipe = DiffusionCLIPPipeline.from_pretrained(model, clip_model_name_or_path=clip, **kwargs)
            except (OSError, ValueError) as error:
                raise _load_error("--model", model, error) from error
        if clip_2:
            try:
                pipe.load_clip(clip_2, second=True, **({"local_files_only": True} if local_2 else {}))
            except OSError as error:
                raise _load_error("--clip-2", clip_2, error, shown=repr(clip_2)) from error
    if device:
        pipe.to(device)
    return pipe


def load_adapters(pipe, paths: list[str] | None, weights: list[float] | None) -> None:
    """Loads every ``--lora`` adapter and activates them all (``--lora-weights``, or 1 each)."""
    names = []
    for i, path in enumerate(paths or []):
        try:  # keep_active: the CLI activates all of them, so the library's "replaces the active set" does not apply
            names.append(pipe.load_lora_weights(path, adapter_name=f"adapter_{i}", keep_active=i > 0))
        except (OSError, ValueError) as error:
            raise CLIError(f"--lora {path}: {one_line(error)}") from error
    if names:
        pipe.set_adapters(names, weights or [1.0] * len(names))


def ensure_clip(pipe, clip: str | None) -> None:
    """Loads the CLIP fine-tuning needs now, before any work, with a one-line error if the hub is unreachable."""
    from ..utils.logging import quiet_loading

    if pipe.clip_model is not None and pipe.clip_tokenizer is not None:
        return
    name = clip or pipe.clip_model_name_or_path
    local = check_source("--clip", name)
    with quiet_loading():
        try:
            pipe.load_clip(name, **({"local_files_only": True} if local else {}))
        except OSError as error:
            if os.path.isdir(name):
                raise CLIError(f"cannot load --clip {name}: {one_line(error.__cause__ or error)}") from error
            raise _hub_error("--clip", name, error) from error

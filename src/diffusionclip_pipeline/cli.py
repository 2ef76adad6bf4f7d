"""The ``diffusionclip`` command: ``finetune | edit | translate | sweep``, mirroring the Python API, and plugin
commands.

``--model`` takes a hub id (``google/ddpm-celebahq-256``; needs the internet), a local pipeline or DDPM folder, or
the name of a model a plugin registered.

Failures are one line on stderr, never a traceback: ``diffusionclip <command>: error: <what, naming the file or
option>``. Exit status 2 for an error the user can fix (bad options, unreadable or missing files, an adapter for
another model, an unreachable hub, a full disk), 1 for an internal error (``diffusionclip <command>: internal error:
<type>: <message>``; ``DIFFUSIONCLIP_DEBUG=1`` shows the traceback) and 130 after Ctrl-C. Option values are checked
while parsing; paths, the output folder, the device and the model's whereabouts are checked next, before any model
loads or any training starts. Outputs are written atomically (a file is complete or absent), a fine-tuned adapter
only once training has finished, and an error or interruption says what had been written. Library warnings are
shown as one line each. Module-level imports are light (no torch, diffusers or transformers), so ``--help`` and
usage errors are quick; every command imports what it needs when it runs.

Plugins add ``--model`` names and sub-commands without this module knowing them. A plugin is a function without
arguments, published as an entry point of the group ``diffusionclip_pipeline.plugins``::

    [project.entry-points."diffusionclip_pipeline.plugins"]
    myplugin = "mypackage.cli_plugin:register"

that calls `register_model` (a name, its loader, its recommended ``finetune`` / ``edit`` settings and CPU threads,
and optionally fast presets for ``--fast`` and a renderer of training images) and `register_command` (a
sub-command: its arguments and what it runs). The CLI calls every plugin once, when it builds its parser or resolves
a ``--model``. Entry points, because
the dependency then points one way only (a plugin imports this module, never the reverse), a plugin in another
distribution works exactly like one shipped here, and a missing or broken plugin costs only its own names: it is
reported in one line and the rest of the CLI works.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

__all__ = [
    "PLUGIN_GROUP",
    "CLIError",
    "build_parser",
    "check_device",
    "check_output",
    "checked",
    "load_pipeline",
    "load_plugins",
    "main",
    "quiet_loading",
    "register_command",
    "register_model",
    "set_num_threads",
]

PLUGIN_GROUP = "diffusionclip_pipeline.plugins"
BUILTIN_COMMANDS = ("finetune", "edit", "translate", "sweep")
DEBUG_ENV = "DIFFUSIONCLIP_DEBUG"
DEFAULT_NUM_RENDERED = 16  # training images a registered model renders when --num-images is not given
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class CLIError(Exception):
    """A user error: printed as one line."""


# ---- plugins ----------------------------------------------------------------------------------------------------

Settings = Mapping[str, Any] | Callable[[], Mapping[str, Any]]


@dataclass(frozen=True)
class RegisteredModel:
    """A ``--model`` name: its loader, the settings it recommends (read at each call, so edits to them count; a
    callable is called then, so a plugin can defer heavy imports), and optionally its fast presets (``--fast``), a
    renderer of training images and the CPU thread count it runs best with."""

    load: Callable[[], Any]
    finetune_defaults: Settings
    edit_defaults: Settings
    help: str = ""
    render: Callable[[str, int, int], list] | None = None
    num_threads: int | None = None
    fast_finetune_defaults: Settings | None = None
    fast_edit_defaults: Settings | None = None

    def has_fast(self, kind: str) -> bool:
        """Whether the model registered fast ``kind`` (``"finetune"`` or ``"edit"``) settings."""
        return (self.fast_finetune_defaults if kind == "finetune" else self.fast_edit_defaults) is not None

    def settings(self, kind: str, fast: bool = False) -> Mapping[str, Any]:
        """The recommended ``kind`` settings, or with ``fast`` the fast preset (empty if none was registered)."""
        if fast:
            value = self.fast_finetune_defaults if kind == "finetune" else self.fast_edit_defaults
        else:
            value = self.finetune_defaults if kind == "finetune" else self.edit_defaults
        value = value() if callable(value) else value
        return value or {}


@dataclass(frozen=True)
class RegisteredCommand:
    """A sub-command: ``add_arguments(parser)`` fills its parser, ``run(args)`` runs it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]
    num_threads: int | None = None


@dataclass
class _Registry:
    models: dict[str, RegisteredModel] = field(default_factory=dict)
    commands: dict[str, RegisteredCommand] = field(default_factory=dict)
    plugins_loaded: bool = False


_registry = _Registry()


def register_model(
    name: str,
    load: Callable[[], Any],
    finetune_defaults: Settings | None = None,
    edit_defaults: Settings | None = None,
    help: str = "",
    render: Callable[[str, int, int], list] | None = None,
    num_threads: int | None = None,
    fast_finetune_defaults: Settings | None = None,
    fast_edit_defaults: Settings | None = None,
) -> None:
    """Makes ``--model name`` load ``load()`` (a `DiffusionCLIPPipeline`).

    Args:
        name (`str`): The ``--model`` value (no ``/``: hub ids have one).
        load (`Callable[[], DiffusionCLIPPipeline]`): Loads the model.
        finetune_defaults / edit_defaults (`Mapping` or `Callable[[], Mapping]`, *optional*): Recommended settings,
            under the options given on the command line; a callable is called when they are needed.
        fast_finetune_defaults / fast_edit_defaults (`Mapping` or `Callable[[], Mapping]`, *optional*): Fast presets
            that ``finetune --fast`` / ``edit --fast`` (and ``sweep --fast``) use instead of the recommended settings,
            still under the options given. Without one, ``--fast`` is an error for this model.
        help (`str`, *optional*): Shown in ``--model``'s help.
        render (`Callable[[str, int, int], list[PIL.Image.Image]]`, *optional*): ``render(prompt, num_images,
            seed)`` draws training images showing ``prompt``, or raises `ValueError` saying why it cannot (e.g. the
            prompt names nothing it can draw). ``finetune`` without ``--images`` then trains on what it renders for
            ``--src`` (and ``--render PROMPT`` asks for it explicitly) instead of sampling from the model.
        num_threads (`int`, *optional*): CPU threads the model runs best with, used when neither ``--threads`` nor
            ``OMP_NUM_THREADS`` is given (tiny models are fastest on one thread, above all on a busy machine).
    """
    if not isinstance(name, str) or not name or "/" in name or os.sep in name:
        raise ValueError(f"A model name must be a non-empty string without '/' (hub ids have one), got {name!r}.")
    if name in _registry.models:
        raise ValueError(f"The model {name!r} is already registered.")
    if render is not None and not callable(render):
        raise TypeError(f"`render` must be callable, got {render!r}.")
    for option, value in (
        ("finetune_defaults", finetune_defaults), ("edit_defaults", edit_defaults),
        ("fast_finetune_defaults", fast_finetune_defaults), ("fast_edit_defaults", fast_edit_defaults),
    ):  # fmt: skip
        if value is not None and not (isinstance(value, Mapping) or callable(value)):
            raise TypeError(f"`{option}` must be a mapping, a callable returning one, or None, got {value!r}.")
    _registry.models[name] = RegisteredModel(
        load, finetune_defaults or {}, edit_defaults or {}, help, render, num_threads, fast_finetune_defaults,
        fast_edit_defaults,
    )  # fmt: skip


def register_command(
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], None],
    num_threads: int | None = None,
) -> None:
    """Adds the sub-command ``diffusionclip name``; ``run`` may raise `CLIError`, `ValueError` or `OSError` (shown as
    one line). Its parser already has ``--threads`` and ``--quiet``; the threads are set before ``run`` is called
    (``num_threads``: the count used when neither ``--threads`` nor ``OMP_NUM_THREADS`` is given)."""
    if name in BUILTIN_COMMANDS or name in _registry.commands:
        raise ValueError(f"The command {name!r} already exists.")
    _registry.commands[name] = RegisteredCommand(help, add_arguments, run, num_threads)


def load_plugins() -> None:
    """Calls each ``diffusionclip_pipeline.plugins`` entry point once; a failing one is reported and undone."""
    if _registry.plugins_loaded:
        return
    _registry.plugins_loaded = True
    seen = set()
    for entry_point in entry_points(group=PLUGIN_GROUP):
        if (entry_point.name, entry_point.value) in seen:  # one distribution found twice on sys.path
            continue
        seen.add((entry_point.name, entry_point.value))
        models, commands = dict(_registry.models), dict(_registry.commands)
        try:
            entry_point.load()()
        except Exception as error:  # a broken plugin must not take the other commands down
            _registry.models, _registry.commands = models, commands
            name = f"{entry_point.name!r} ({entry_point.value})"
            print(f"diffusionclip: plugin {name} not loaded: {type(error).__name__}: {error}", file=sys.stderr)


# ---- checks made before any work ----------------------------------------------------------------------------------


def checked(check: Callable | str, **bounds) -> type[argparse.Action]:
    """An argparse action passing the option's value (or each of its values) through a `validation` check.

    ``add_argument("--batch-size", type=int, action=checked("check_positive_int"))``: ``--batch-size 0`` ends
    parsing with the one line ``"diffusionclip edit: error: `--batch-size` must be a positive integer, got 0."``
    and exit status 2. ``check`` is a function, or the name of one in `diffusionclip_pipeline.validation`, imported
    only when an option is given (building the parser stays light).
    """

    class CheckedAction(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            name = option_string or self.dest
            fn = check
            if isinstance(fn, str):
                from . import validation

                fn = getattr(validation, fn)
            try:
                if isinstance(values, list):
                    values = [fn(value, name, **bounds) for value in values]
                else:
                    values = fn(values, name, **bounds)
            except (TypeError, ValueError) as error:
                parser.exit(2, f"{parser.prog}: error: {error}\n")
            setattr(namespace, self.dest, values)

    return CheckedAction


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
            raise CLIError(f"--device {device} is not usable here: {_one_line(error)}") from None


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


def _read_inputs(paths: list[str], option: str = "--images") -> tuple[list, list[str]]:
    """The images (RGB PIL) and their files; every file is read and checked here."""
    from .image_io import find_images, read_image

    try:
        files = find_images(paths)
    except (OSError, ValueError) as error:
        raise CLIError(f"{option}: {error}") from None
    return [read_image(f) for f in files], files


def _check_adapters(paths: list[str] | None, weights: list[float] | None) -> None:
    for path in paths or []:
        if not os.path.exists(path):
            raise CLIError(f"--lora {path}: no such adapter file or folder")
    if weights and len(weights) != len(paths or []):
        raise CLIError(f"--lora-weights has {len(weights)} values for {len(paths or [])} --lora adapters")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as huggingface_hub reads it; also when set after it loaded."""
    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE")):
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


def _check_source(option: str, name: str | None) -> bool:
    """``name`` (of ``--clip`` / ``--clip-2`` / an unregistered ``--model``) is a folder or a reachable hub id;
    returns whether to load it from the local cache only."""
    if name is None or os.path.isdir(name):
        return False
    if os.path.exists(name):
        raise CLIError(f"{option} {name}: is a file; pass a folder or a hub id owner/name")
    if not HUB_ID.fullmatch(name):
        raise CLIError(f"{option} {name}: no such folder, and not a hub id owner/name")
    return _check_hub_source(option, name)


def _check_model(model: str, clip: str | None = None) -> RegisteredModel | None:
    """``--model`` (and ``--clip``) can be loaded; returns the registered model, if ``model`` names one."""
    load_plugins()
    registered = _registry.models.get(model)
    if registered is not None:
        if clip:
            raise CLIError(f"--clip does not apply to --model {model}: it brings its own CLIP")
        return registered
    if not os.path.exists(model) and not HUB_ID.fullmatch(model):
        known = ", ".join(_registry.models) or f"none; plugins are the '{PLUGIN_GROUP}' entry points"
        raise CLIError(f"unknown model {model!r}: not a registered model (registered: {known}), a folder, or a "
                       "hub id owner/name")  # fmt: skip
    _check_source("--model", model)
    _check_source("--clip", clip)
    return None


def set_num_threads(threads: int | None = None, recommended: int | None = None) -> int:
    """Sets torch's CPU threads before any model work and returns the count in use.

    ``threads`` (``--threads``) wins, then ``OMP_NUM_THREADS`` if set, then ``recommended`` (a registered model's
    or command's), else torch's default (one per core). On a machine another process keeps busy, fewer threads are
    much faster: editing one 32 px test-bed image took 53-90 s with 2 threads on a busy 2-core machine, 7.3 s with 1.
    """
    import torch

    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if threads is None and env:
        if not env.isdigit() or int(env) < 1:
            raise CLIError(f"OMP_NUM_THREADS={env!r} is not a positive integer (unset it, or pass --threads N)")
        threads = int(env)
    if threads is None:
        threads = recommended
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# ---- loading ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Inside the block, loading models shows no progress bars (``Loading weights: 100%|...| 110/110``) and no
    library chatter below errors (diffusers, transformers and huggingface_hub log at ERROR level)."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    bars = [lib.is_progress_bar_enabled() for lib in libraries]
    levels = [lib.get_verbosity() for lib in (*libraries, hub_logging)]
    for lib in libraries:
        lib.disable_progress_bar()
    for lib in (*libraries, hub_logging):
        lib.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")  # huggingface_hub, via diffusers
            yield
    finally:
        for lib, on in zip(libraries, bars):
            lib.enable_progress_bar() if on else lib.disable_progress_bar()
        for lib, level in zip((*libraries, hub_logging), levels):
            lib.set_verbosity(level)


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
    return CLIError(f"cannot load {option} {name}: {_one_line(error)}")


def load_pipeline(model: str, clip: str | None = None, device: str | None = None, clip_2: str | None = None):
    """A `DiffusionCLIPPipeline` from a registered model name, a folder or a hub id; ``clip_2`` sets a second CLIP.

    Every failure is a `CLIError` of one line: an unknown model, an offline or unreachable hub (at once, when the
    model is not cached), a folder that is not a pipeline, a malformed ``lora/adapters.json``, an unusable device.
    """
    registered = _check_model(model, clip)
    local_2 = _check_source("--clip-2", clip_2)
    check_device(device)
    with quiet_loading():
        if registered is not None:
            pipe = registered.load()
        else:
            from .pipeline_diffusionclip import DiffusionCLIPPipeline

            kwargs = {"local_files_only": True} if _check_source("--model", model) else {}  # only the cache
            try:
                pipe = DiffusionCLIPPipeline.from_pretrained(model, clip_model_name_or_path=clip, **kwargs)
            except (OSError, ValueError) as error:
                if os.path.isdir(model):
                    raise CLIError(f"cannot load --model {model}: {_one_line(error)}") from error
                raise _hub_error("--model", model, error) from error
        if clip_2:
            try:
                pipe.load_clip(clip_2, second=True, **({"local_files_only": True} if local_2 else {}))
            except OSError as error:
                if os.path.isdir(clip_2):
                    raise CLIError(f"cannot load --clip-2 {clip_2!r}: {_one_line(error)}") from error
                raise _hub_error("--clip-2", clip_2, error) from error
    if device:
        pipe.to(device)
    return pipe


def _load_adapters(pipe, paths: list[str] | None, weights: list[float] | None) -> None:
    """Loads every ``--lora`` adapter and activates them all (``--lora-weights``, or 1 each)."""
    names = []
    for i, path in enumerate(paths or []):
        try:  # keep_active: the CLI activates all of them, so the library's "replaces the active set" does not apply
            names.append(pipe.load_lora_weights(path, adapter_name=f"adapter_{i}", keep_active=i > 0))
        except (OSError, ValueError) as error:
            raise CLIError(f"--lora {path}: {_one_line(error)}") from error
    if names:
        pipe.set_adapters(names, weights or [1.0] * len(names))


def _ensure_clip(pipe, clip: str | None) -> None:
    """Loads the CLIP fine-tuning needs now, before any work, with a one-line error if the hub is unreachable."""
    if pipe.clip_model is not None and pipe.clip_tokenizer is not None:
        return
    name = clip or pipe.clip_model_name_or_path
    local = _check_source("--clip", name)
    with quiet_loading():
        try:
            pipe.load_clip(name, **({"local_files_only": True} if local else {}))
        except OSError as error:
            if os.path.isdir(name):
                raise CLIError(f"cannot load --clip {name}: {_one_line(error.__cause__ or error)}") from error
            raise _hub_error("--clip", name, error) from error


# ---- what the commands say ---------------------------------------------------------------------------------------


def _one_line(error: BaseException | str, limit: int = 600) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _note(args: argparse.Namespace, message: str) -> None:
    print(f"diffusionclip {args.command}: {message}", file=sys.stderr)


def _resolution(pipe) -> int:
    return int(getattr(pipe, "resolution", None) or pipe.unet.config.sample_size)


def _say_resolution(args, pipe, images: list, files: list[str]) -> None:
    """Says the output size up front when some input differs from it."""
    size = _resolution(pipe)
    other = [(f, im.size) for f, im in zip(files, images) if im.size != (size, size)]
    if other:
        (f, (w, h)), n = other[0], len(other)
        _note(args, f"the model works at {size}x{size}: outputs are {size} px, inputs are centre-cropped and resized "
                    f"({n} of {len(images)} input(s) differ, e.g. {os.path.basename(f)} is {w}x{h})")  # fmt: skip


def _as_model_sees_them(pipe, images: list) -> list:
    """The inputs centre-cropped and resized exactly as the model takes them (the grids' "before" row)."""
    from .image_processing import postprocess_image

    return postprocess_image(pipe.prepare_image(images).float().cpu())


def _progress(pipe, args, desc: str) -> None:
    """The pipeline's progress bars on stderr (on a terminal), named ``desc``; none with ``--quiet``."""
    pipe.set_progress_bar_config(disable=True if args.quiet else None, desc=desc, leave=False)


def _save_image(args, image, path: str) -> None:
    from .image_io import save_atomic

    try:
        save_atomic(image, path)
    except OSError as error:
        raise CLIError(f"cannot write {path}: {error.strerror or _one_line(error)}") from error
    args.written.append(path)


def _makedirs(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise CLIError(f"cannot create --output {path}: {error.strerror or error}") from error


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"


# ---- sub-commands ------------------------------------------------------------------------------------------------


def _with_model_defaults(model: str, settings: dict, kind: str, fast: bool = False) -> dict:
    """The options given (``None``: not given) over a registered model's recommended ``kind`` settings, or over its
    fast preset with ``fast`` (``--fast``; a `CLIError` when the model registered none, or is a folder or hub id)."""
    settings = {k: v for k, v in settings.items() if v is not None}
    registered = _registry.models.get(model)
    if fast:
        if registered is None:
            raise CLIError(f"--fast uses the fast {kind} preset of a registered --model; {model} is a folder or hub "
                           f"id, which has none: leave out --fast and pass the options you want")  # fmt: skip
        if not registered.has_fast(kind):
            having = [name for name, m in _registry.models.items() if m.has_fast(kind)]
            raise CLIError(f"--fast: --model {model} registered no fast {kind} preset (models with one: "
                           f"{', '.join(having) or 'none'}); leave out --fast")  # fmt: skip
        return {**registered.settings(kind, fast=True), **settings}
    if registered is None:
        return settings
    return {**registered.settings(kind), **settings}


def _training_images(args, registered: RegisteredModel | None):
    """``--images``, or what ``--render`` (or, by default, ``--src``) renders, or `None`: sample from the model."""
    if args.images:
        if args.render:
            raise CLIError("--render and --images both choose the training images: pass one of them")
        if args.num_images is not None:
            raise CLIError("--num-images counts rendered or sampled images; with --images, pass the files you want")
        return _read_inputs(args.images)
    render = registered.render if registered is not None else None
    seed = args.seed or 0
    if args.render:
        if render is None:
            can = [name for name, m in _registry.models.items() if m.render is not None]
            raise CLIError(f"--render needs a --model that renders images ({', '.join(can) or 'none is registered'});"
                           f" {args.model} does not: pass --images")  # fmt: skip
        try:
            images = render(args.render, args.num_images or DEFAULT_NUM_RENDERED, seed)
        except ValueError as error:
            raise CLIError(f"--render {args.render!r}: {_one_line(error)}") from error
        _note(args, f"rendering {len(images)} training images of {args.render!r} (--render, seed {seed})")
        return images, [f"rendered-{i}.png" for i in range(len(images))]
    if render is not None:
        try:
            images = render(args.src, args.num_images or DEFAULT_NUM_RENDERED, seed)
        except ValueError as error:
            args.sampling_reason = _one_line(error)  # said when the number of samples is known
        else:
            _note(args, f"no --images: rendering {len(images)} training images of {args.src!r} from --model "
                        f"{args.model}'s world (seed {seed}; --images to use your own)")  # fmt: skip
            return images, [f"rendered-{i}.png" for i in range(len(images))]
    return None, []


def _validation_options(args) -> tuple[list | None, list[str]]:
    """``--validation-images`` (read and checked now) and the options that need them."""
    if args.validation_images is None:
        for option, value in (("--validation-epochs", args.validation_epochs), ("--keep-best", args.keep_best)):
            if value is not None:
                raise CLIError(f"{option} needs --validation-images (the held-out images to validate on)")
        images, files = None, []
    else:
        images, files = _read_inputs(args.validation_images, "--validation-images")
    if args.keep_best_min_ssim is not None and args.keep_best is None:
        raise CLIError("--keep-best-min-ssim is a floor for --keep-best: pass --keep-best METRIC too")
    return images, files


def _check_report_to(args) -> str | None:
    """``--report-to``: a known tracker whose package is installed; returns its logging folder, ``--output``/logs."""
    if args.report_to is None:
        return None
    from .finetune import check_report_to

    logging_dir = os.path.join(args.output, "logs")
    try:
        check_report_to(args.report_to, logging_dir)
    except (ImportError, ValueError, TypeError) as error:
        raise CLIError(f"--report-to {args.report_to}: {_one_line(error)}") from None
    return logging_dir


def _write_text(args, text: str, path: str) -> None:
    """Writes ``text`` to ``path`` atomically (a temporary file in the same folder, then renamed)."""
    folder, name = os.path.split(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
                handle.write(text)
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)  # mkstemp creates 0o600; a plain write would honour the umask
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as error:
        raise CLIError(f"cannot write {path}: {error.strerror or _one_line(error)}") from error
    args.written.append(path)


def _csv(rows: list[dict]) -> str:
    import csv
    import io

    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _table(rows: list[dict]) -> str:
    """The rows as a Markdown table (scores to 4 decimals, settings as given)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(key, value):
        if key in ("t0", "edit_strength", "epoch"):
            return f"{value:g}" if isinstance(value, float) else str(value)
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(k, row.get(k, "")) for k in columns) + " |" for row in rows]
    return "\n".join(lines)


def _finetune(args) -> None:
    # 1. Check everything before any work: output, images, model, device, validation, tracker, settings
    check_output(args.output)
    registered = _check_model(args.model, args.clip)
    _check_source("--clip-2", args.clip_2)
    check_device(args.device)
    images, files = _training_images(args, registered)
    validation_images, _ = _validation_options(args)
    logging_dir = _check_report_to(args)
    settings = dict(
        t0=args.t0, num_inversion_steps=args.num_inversion_steps, num_train_steps=args.num_train_steps,
        num_epochs=args.num_epochs, learning_rate=args.learning_rate, batch_size=args.batch_size,
        lora_rank=args.lora_rank, l1_loss_weight=args.l1_loss_weight, scheme=args.scheme, seed=args.seed,
        num_fixed_point_iterations=args.num_fixed_point_iterations,
        num_sampled_images=args.num_images if images is None else None,
    )  # fmt: skip
    if args.lora_rank is not None:  # keep the LoRA scale alpha / r at 1, as the library's defaults do
        settings["lora_alpha"] = float(args.lora_rank)
    settings = _with_model_defaults(args.model, settings, "finetune", fast=args.fast)
    from .finetune import FinetuneConfig, finetune

    config = FinetuneConfig.from_kwargs(**settings)  # the settings' errors, before loading
    set_num_threads(args.threads, registered.num_threads if registered else None)

    # 2. Load, then fine-tune
    pipe = load_pipeline(args.model, args.clip, args.device, clip_2=args.clip_2)
    _ensure_clip(pipe, args.clip)
    if images is None:
        reason = getattr(args, "sampling_reason", None)
        what = f"no --images, and {reason}" if reason else "no --images"
        hint = "--images or --render PROMPT" if registered is not None and registered.render else "--images"
        _note(args, f"{what}: sampling {config.num_sampled_images} training images from the model, of whatever it "
                    f"generates ({hint} to choose them)")  # fmt: skip
    else:
        _say_resolution(args, pipe, images, files)
    _progress(pipe, args, "fine-tuning")
    validation = dict(
        validation_images=validation_images, validation_epochs=args.validation_epochs, keep_best=args.keep_best,
        keep_best_min_ssim=args.keep_best_min_ssim, report_to=args.report_to, logging_dir=logging_dir,
    )  # fmt: skip
    from .lora import unet_lock

    start = time.perf_counter()
    with unet_lock(pipe.unet):  # as `pipe.finetune` holds it
        output = finetune(
            pipe, args.src, args.tar, images=images, config=config,
            **{k: v for k, v in validation.items() if v is not None},
        )  # fmt: skip
    elapsed = time.perf_counter() - start
    # 3. The adapter, written only now that training is done (atomically), and the validation's table and grid
    try:
        path = pipe.save_lora_weights(args.output)
    except OSError as error:
        raise CLIError(f"cannot write the adapter to {args.output}: {error.strerror or _one_line(error)}") from error
    args.written.append(path)
    losses = output.loss_history
    print(f"saved {path} (loss {losses[0]:.4f} -> {losses[-1]:.4f}; {_count(config.num_epochs, 'epoch')}, "
          f"{_count(len(losses), 'step')} in {_duration(elapsed)})")  # fmt: skip
    if output.validation:
        _write_text(args, _csv(output.validation), os.path.join(args.output, "validation.csv"))
        _save_image(args, output.validation_grid, os.path.join(args.output, "validation.png"))
        print(f"\nvalidation on {_count(len(validation_images), 'held-out image')}:\n{_table(output.validation)}")
        kept = output.best_epoch or output.validation[-1]["epoch"]
        why = f"the best by --keep-best {args.keep_best}" if output.best_epoch else "the last"
        print(
            f"kept the adapter of epoch {kept} ({why}); wrote validation.csv and validation.png (rows: held-out "
            f"images as the model sees them, then their edit after each validated epoch) to {args.output}"
        )
    if logging_dir is not None:
        print(f"{args.report_to} logs in {logging_dir}")


def _edit(args) -> None:
    from .image_io import image_grid, unique_stems

    # 1. Check everything before any work: images, adapters, output, model, device
    images, files = _read_inputs(args.images)
    stems = unique_stems(files)
    _check_adapters(args.lora, args.lora_weights)
    check_output(args.output)
    registered = _check_model(args.model, args.clip)
    check_device(args.device)
    settings = dict(
        t0=args.t0, num_inversion_steps=args.num_inversion_steps, num_inference_steps=args.num_inference_steps,
        num_fixed_point_iterations=args.num_fixed_point_iterations,
    )  # fmt: skip
    settings = _with_model_defaults(args.model, settings, "edit", fast=args.fast)
    set_num_threads(args.threads, registered.num_threads if registered else None)

    # 2. Load the model and the adapters
    pipe = load_pipeline(args.model, args.clip, args.device)
    _load_adapters(pipe, args.lora, args.lora_weights)
    reconstructing = not pipe.get_active_adapters() or args.edit_strength == 0
    if reconstructing:
        active = pipe.get_active_adapters()
        why = "--edit-strength 0" if active else "no --lora given" if not args.lora else "no adapter is active"
        _note(args, f"{why}: writing reconstructions, not edits")
    elif not args.lora:
        _note(args, f"no --lora given: editing with the --model folder's active adapters {pipe.get_active_adapters()}")
    _say_resolution(args, pipe, images, files)

    # 3. Edit batch by batch, writing each image (atomically) as soon as it is done
    from .pipeline_diffusionclip import NoAdapterWarning

    _makedirs(args.output)
    kind = "reconstructed" if reconstructing else "edited"
    before, after, renamed = [], [], []
    n = len(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoAdapterWarning)  # said once above, in the CLI's words
        for start in range(0, n, args.batch_size):
            batch = images[start : start + args.batch_size]
            _progress(pipe, args, f"{'reconstructing' if reconstructing else 'editing'} images "
                                  f"{start + 1}-{start + len(batch)} of {n}")  # fmt: skip
            generator = _generators(args.seed, start, len(batch))
            edited = pipe.edit(batch, edit_strength=args.edit_strength, generator=generator, **settings).images
            for file, stem, out in zip(files[start:], stems[start:], edited):
                name = f"{stem}_edited.png"
                _save_image(args, out, os.path.join(args.output, name))
                if stem != os.path.splitext(os.path.basename(file))[0]:
                    renamed.append(f"{file} -> {name}")
            before += _as_model_sees_them(pipe, batch)
            after += edited
    _save_image(args, image_grid([before, after]), os.path.join(args.output, "grid.png"))
    if renamed:
        _note(args, "inputs with the same name got distinct outputs: " + ", ".join(renamed))
    print(f"wrote {n} {kind} images and grid.png (top: input as the model sees it, bottom: {kind}) to {args.output}")


def _generators(seed: int, start: int, n: int) -> list:
    """One generator per image, image ``i`` (counted over all inputs) seeded ``seed + i``: the noise of
    ``encoding="noise"`` (e.g. a --fast preset's) is then the image's own, whatever the batch size."""
    import torch

    return [torch.Generator().manual_seed(seed + i) for i in range(start, start + n)]


def _sweep(args) -> None:
    # 1. Check everything before any work: images, adapters, output, model, device, settings
    images, files = _read_inputs(args.images)
    _check_adapters(args.lora, args.lora_weights)
    check_output(args.output)
    registered = _check_model(args.model, args.clip)
    _check_source("--clip-2", args.clip_2)
    check_device(args.device)
    settings = dict(
        num_inversion_steps=args.num_inversion_steps, num_inference_steps=args.num_inference_steps,
        num_fixed_point_iterations=args.num_fixed_point_iterations,
    )  # fmt: skip
    settings = _with_model_defaults(args.model, settings, "edit", fast=args.fast)
    settings = {k: v for k, v in settings.items() if k not in ("t0", "edit_strength")}  # swept here
    set_num_threads(args.threads, registered.num_threads if registered else None)

    # 2. Load the model, the adapters and the CLIP that scores
    pipe = load_pipeline(args.model, args.clip, args.device, clip_2=args.clip_2)
    _load_adapters(pipe, args.lora, args.lora_weights)
    _ensure_clip(pipe, args.clip)
    if not pipe.get_active_adapters():
        _note(args, f"{'no --lora given' if not args.lora else 'no adapter is active'}: every setting is a "
                    "reconstruction (edit strength has no adapter to scale)")  # fmt: skip
    _say_resolution(args, pipe, images, files)

    # 3. Sweep, then write the grid and the table
    from .evaluation import sweep
    from .pipeline_diffusionclip import NoAdapterWarning

    kwargs = {"edit_strengths": args.edit_strength, "t0s": args.t0}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}  # not given: the library's defaults
    _progress(pipe, args, "sweeping")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoAdapterWarning)  # said once above, in the CLI's words
        out = sweep(
            pipe, images, args.src, args.tar, **kwargs, batch_size=args.batch_size,
            generator=_generators(args.seed, 0, len(images)), **settings,
        )  # fmt: skip
    _makedirs(args.output)
    _save_image(args, out.grid, os.path.join(args.output, "grid.png"))
    _write_text(args, _csv(out.table), os.path.join(args.output, "metrics.csv"))
    print(_table(out.table))
    print(f"wrote grid.png (rows: the {_count(len(images), 'input')} as the model sees them, then one row per "
          f"setting in the table's order) and metrics.csv to {args.output}")  # fmt: skip


def _translate(args) -> None:
    from .image_io import image_grid, unique_stems

    images, files = _read_inputs(args.images)
    stems = unique_stems(files)
    _check_adapters(args.lora, None)
    check_output(args.output)
    registered = _check_model(args.model, args.clip)
    check_device(args.device)
    set_num_threads(args.threads, registered.num_threads if registered else None)
    import torch

    pipe = load_pipeline(args.model, args.clip, args.device)
    _load_adapters(pipe, args.lora, None)
    if not pipe.get_active_adapters():
        _note(args, "no --lora given: translating onto the model's domain only, without an edit")
    _say_resolution(args, pipe, images, files)
    _progress(pipe, args, "translating")
    generator = torch.Generator().manual_seed(args.seed)
    out = pipe.translate(images, t0=args.t0, n_iter=args.n_iter, edit_t0=args.edit_t0, generator=generator)
    _makedirs(args.output)
    for stem, final in zip(stems, out.images):
        _save_image(args, final, os.path.join(args.output, f"{stem}_translated.png"))
    rows = [_as_model_sees_them(pipe, images), list(out.domain_images), list(out.images)]
    _save_image(args, image_grid(rows), os.path.join(args.output, "grid.png"))
    print(f"wrote {len(images)} images and grid.png (rows: input as the model sees it, in-domain, final) to "
          f"{args.output}")  # fmt: skip


# ---- argument parsing ------------------------------------------------------------------------------------------

KEEP_BEST = ("s_dir", "s_dir_2", "clip_score", "mae", "ssim")  # finetune.KEEP_BEST (not imported: --help stays light)
POSITIVE = checked("check_positive_int")
NON_NEGATIVE = checked("check_non_negative_int")
POSITIVE_NUMBER = checked("check_number", minimum=0.0, min_inclusive=False)

# finetune option -> FinetuneConfig field (their help and defaults are read from the dataclass when help is shown)
FINETUNE_FIELDS = {
    "t0": "t0", "num_inversion_steps": "num_inversion_steps", "num_train_steps": "num_train_steps",
    "num_epochs": "num_epochs", "learning_rate": "learning_rate", "batch_size": "batch_size",
    "lora_rank": "lora_rank", "l1_loss_weight": "l1_loss_weight", "seed": "seed",
    "num_fixed_point_iterations": "num_fixed_point_iterations", "scheme": "scheme",
}  # fmt: skip
EDIT_OPTIONS = {
    "t0": "inversion depth: the timestep the input is inverted to and regenerated from (larger edits more)",
    "num_inversion_steps": "DDIM steps of the inversion",
    "num_inference_steps": "DDIM steps of the regeneration",
    "num_fixed_point_iterations": "fixed-point refinements per inversion step (exact inversion; 0: the paper's)",
}


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option's help that does not say its default already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(" not in text:  # argparse %-formats help texts; a plain "%" must be doubled
            text = text.replace("%", "%%")
        default = action.default
        unset = any(default is v for v in (None, False, argparse.SUPPRESS))  # 0 is a default worth showing
        if "default" in text or not action.option_strings or unset:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class _Parser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose help may be completed only when it is shown (`describe_defaults`), so
    that building the parser imports nothing heavy while ``--help`` still shows the library's real defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.describe_defaults: Callable[[argparse.ArgumentParser], None] | None = None

    def format_help(self):
        if self.describe_defaults is not None:
            describe, self.describe_defaults = self.describe_defaults, None
            describe(self)
        return super().format_help()


def _registered_defaults(kind: str, key: str, default) -> str:
    notes = []
    for name, model in _registry.models.items():
        try:
            value = model.settings(kind).get(key, default)
        except Exception:  # a plugin's broken settings must not break --help
            continue
        if value != default:
            notes.append(f"--model {name}: {value}")
    return "".join(f"; {note}" for note in notes)


def _fast_models(kind: str) -> str:
    having = [name for name, model in _registry.models.items() if model.has_fast(kind)]
    return f"; models with one: {', '.join(having)}" if having else "; no registered model has one yet"


def _describe_finetune_defaults(parser: argparse.ArgumentParser) -> None:
    from dataclasses import MISSING, fields

    from .finetune import FinetuneConfig

    config = {f.name: f for f in fields(FinetuneConfig)}
    for action in parser._actions:
        key = FINETUNE_FIELDS.get(action.dest)
        if key is None:
            continue
        f = config[key]
        default = f.default if f.default is not MISSING else None
        note = {"lora_rank": "; LoRA alpha is set to it (scale 1)", "seed": "; also of rendered training images"}
        text = f.metadata.get("help", "").rstrip(".") + note.get(key, "")
        action.help = f"{text} (default: {default}{_registered_defaults('finetune', key, default)})"
    sampled = config["num_sampled_images"].default
    for action in parser._actions:
        if action.dest == "num_images":
            action.help = (f"training images to render (--render, or --src on a model that renders: "
                           f"{DEFAULT_NUM_RENDERED}) or to sample from the model ({sampled})")  # fmt: skip


def _describe_edit_defaults(parser: argparse.ArgumentParser) -> None:
    import inspect

    from .pipeline_diffusionclip import DiffusionCLIPPipeline

    parameters = inspect.signature(DiffusionCLIPPipeline.edit).parameters
    swept = ("t0",) if parser.prog.endswith(" sweep") else ()  # sweep's --t0 lists depths, with its own help
    for action in parser._actions:
        if action.dest in EDIT_OPTIONS and action.dest in parameters and action.dest not in swept:
            default = parameters[action.dest].default
            action.help = f"{EDIT_OPTIONS[action.dest]} (default: {default}"
            action.help += f"{_registered_defaults('edit', action.dest, default)})"


def _common_args(p: argparse.ArgumentParser) -> None:
    """``--threads`` and ``--quiet``, on every sub-command (a plugin command that defines them keeps its own)."""
    if "--threads" not in p._option_string_actions:
        p.add_argument("--threads", type=int, action=POSITIVE, default=None,
                       help="CPU threads for torch, set before any model work (default: OMP_NUM_THREADS if set, else "
                            "the model's or command's recommendation, else one per core); on a busy machine, 1 is "
                            "often several times faster")  # fmt: skip
    if "--quiet" not in p._option_string_actions:
        p.add_argument("--quiet", action="store_true", help="no progress bars (messages and warnings are still shown)")


def build_parser() -> argparse.ArgumentParser:
    load_plugins()
    commands = [*BUILTIN_COMMANDS, *_registry.commands]
    parser = _Parser(
        prog="diffusionclip",
        description="DiffusionCLIP (CVPR 2022) text-driven image editing with LoRA-fine-tuned diffusers DDPMs.",
        epilog="`diffusionclip <command> --help` lists a command's options and their defaults.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(commands) + "}")
    registered = "".join(f"; {name}: {m.help}" if m.help else f"; {name}" for name, m in _registry.models.items())

    def fast_edit(p):
        p.add_argument("--fast", action="store_true",
                       help=f"the --model's fast edit preset instead of its recommended settings (options given "
                            f"still win){_fast_models('edit')}")  # fmt: skip
        p.add_argument("--seed", type=int, action=NON_NEGATIVE, default=0,
                       help="seed of the encoding noise of a setting with encoding='noise', e.g. a --fast preset's "
                            "(image i of the inputs: seed + i)")  # fmt: skip

    def model_args(p):
        p.add_argument("--model", required=True, help=f"hub id, pipeline/DDPM folder or registered name{registered}")
        p.add_argument(
            "--clip",
            default=None,
            help="CLIP id or folder if the model has none (default: openai/clip-vit-base-patch16)",
        )
        p.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1 or mps (default: cpu)")
        _common_args(p)

    p = sub.add_parser("finetune", help="train a LoRA adapter for a text edit and save it")
    model_args(p)
    p.add_argument("--src", required=True, help="source text, e.g. 'face'")
    p.add_argument("--tar", required=True, help="target text, e.g. 'smiling face'")
    p.add_argument("--images", nargs="*",
                   help="training image files/folders (default: rendered from --src by a model that renders, e.g. "
                        "testbed, else sampled from the model)")  # fmt: skip
    p.add_argument(
        "--render",
        default=None,
        metavar="PROMPT",
        help="train on images the --model renders of PROMPT (e.g. 'red circle' for testbed)",
    )
    p.add_argument("--num-images", type=int, action=POSITIVE, default=None,
                   help="training images to render or sample")  # fmt: skip
    p.add_argument("--output", required=True, help="folder for pytorch_lora_weights.safetensors")
    p.add_argument(
        "--clip-2",
        default=None,
        help="a second CLIP (id or folder): the CLIP loss is averaged over both (e.g. ViT-B/32 + B/16)",
    )
    for flag, kind, action in [
        ("--t0", int, POSITIVE), ("--num-inversion-steps", int, POSITIVE), ("--num-train-steps", int, POSITIVE),
        ("--num-epochs", int, POSITIVE), ("--learning-rate", float, POSITIVE_NUMBER), ("--batch-size", int, POSITIVE),
        ("--lora-rank", int, POSITIVE), ("--l1-loss-weight", float, checked("check_number", minimum=0.0)),
        ("--seed", int, NON_NEGATIVE), ("--num-fixed-point-iterations", int, NON_NEGATIVE),
    ]:  # fmt: skip
        p.add_argument(flag, type=kind, action=action, default=None, help="see FinetuneConfig")
    p.add_argument("--scheme", choices=("efficient", "full_chain"), default=None, help="see FinetuneConfig")
    p.add_argument("--fast", action="store_true",
                   help=f"the --model's fast fine-tuning preset instead of its recommended settings (options given "
                        f"still win){_fast_models('finetune')}")  # fmt: skip
    p.add_argument("--validation-images", nargs="+", default=None, metavar="PATHS",
                   help="held-out image files/folders: edited and scored (s_dir, mae, ssim, clip_score) after every "
                        "--validation-epochs epochs and after the last; writes validation.csv and validation.png "
                        "next to the adapter")  # fmt: skip
    p.add_argument("--validation-epochs", type=int, action=POSITIVE, default=None, metavar="K",
                   help="validate after every K-th epoch, and after the last (default: 1)")  # fmt: skip
    p.add_argument("--keep-best", choices=KEEP_BEST, default=None, metavar="METRIC",
                   help=f"keep the adapter of the best validated epoch by METRIC ({', '.join(KEEP_BEST)}; mae: the "
                        "smallest, the others: the largest) instead of the last one's")  # fmt: skip
    p.add_argument("--keep-best-min-ssim", type=float, default=None, metavar="X",
                   action=checked("check_number", minimum=-1.0, maximum=1.0),
                   help="identity floor for --keep-best: epochs whose ssim is below X are not eligible")  # fmt: skip
    p.add_argument("--report-to", default=None, metavar="NAME",
                   help="an accelerate tracker (tensorboard, wandb, ...; its package installed) for the loss, the "
                        "validation scores and grids, logging to --output/logs")  # fmt: skip
    p.describe_defaults = _describe_finetune_defaults
    p.set_defaults(func=_finetune)

    p = sub.add_parser("edit", help="edit images with one or more adapters; writes edited images and a grid")
    model_args(p)
    p.add_argument("--images", nargs="+", required=True, help="image files/folders")
    p.add_argument(
        "--lora",
        nargs="*",
        help="adapter folders/files, all active at once (default: none, which writes reconstructions)",
    )
    p.add_argument("--lora-weights", nargs="*", type=float, action=checked("check_number"),
                   help="one weight per --lora adapter (default: 1 each)")  # fmt: skip
    p.add_argument("--output", required=True, help="folder for <name>_edited.png and grid.png")
    for flag in ("--t0", "--num-inversion-steps", "--num-inference-steps", "--num-fixed-point-iterations"):
        action = NON_NEGATIVE if flag == "--num-fixed-point-iterations" else POSITIVE
        p.add_argument(flag, type=int, action=action, default=None, help="see `DiffusionCLIPPipeline.edit`")
    p.add_argument("--edit-strength", "--strength", dest="edit_strength", type=float, default=1.0,
                   action=checked("check_number"),
                   help="edit strength r (0: reconstruction, 1: full edit)")  # fmt: skip
    p.add_argument("--batch-size", type=int, action=POSITIVE, default=8, help="images edited at once")
    fast_edit(p)
    p.describe_defaults = _describe_edit_defaults
    p.set_defaults(func=_edit)

    p = sub.add_parser("sweep", help="edit held-out images over edit strengths x inversion depths; grid and table")
    model_args(p)
    p.add_argument("--images", nargs="+", required=True, help="held-out image files/folders")
    p.add_argument("--lora", nargs="*", help="adapter folders/files, all active at once (default: none)")
    p.add_argument("--lora-weights", nargs="*", type=float, action=checked("check_number"),
                   help="one weight per --lora adapter (default: 1 each)")  # fmt: skip
    p.add_argument("--src", required=True, help="source text of the edit, e.g. 'face' (for the scores)")
    p.add_argument("--tar", required=True, help="target text of the edit, e.g. 'smiling face'")
    p.add_argument("--clip-2", default=None, help="a second CLIP (id or folder): also reports s_dir_2")
    p.add_argument("--output", required=True, help="folder for grid.png and metrics.csv")
    p.add_argument("--t0", nargs="+", type=int, action=POSITIVE, default=None,
                   help="inversion depths to sweep (default: 300 400 500)")  # fmt: skip
    p.add_argument("--edit-strength", nargs="+", type=float, action=checked("check_number"), default=None,
                   help="edit strengths r to sweep (0: reconstruction, 1: full edit, > 1: extrapolate; "
                        "default: 0.5 1 1.5)")  # fmt: skip
    for flag in ("--num-inversion-steps", "--num-inference-steps", "--num-fixed-point-iterations"):
        action = NON_NEGATIVE if flag == "--num-fixed-point-iterations" else POSITIVE
        p.add_argument(flag, type=int, action=action, default=None, help="see `DiffusionCLIPPipeline.edit`")
    p.add_argument("--batch-size", type=int, action=POSITIVE, default=8, help="images edited at once")
    fast_edit(p)
    p.describe_defaults = _describe_edit_defaults
    p.set_defaults(func=_sweep)

    p = sub.add_parser("translate", help="pull out-of-domain images (strokes) onto the model's domain, then edit")
    model_args(p)
    p.add_argument("--images", nargs="+", required=True, help="image files/folders (strokes, other backgrounds)")
    p.add_argument("--lora", nargs="*", help="adapter(s) for the final edit (default: none, domain translation only)")
    p.add_argument("--output", required=True, help="folder for <name>_translated.png and grid.png")
    p.add_argument("--t0", type=int, action=POSITIVE, default=500, help="noising depth of each round")
    p.add_argument("--edit-t0", type=int, action=POSITIVE, default=None,
                   help="inversion depth of the final edit (default: --t0)")  # fmt: skip
    p.add_argument("--n-iter", type=int, action=POSITIVE, default=10,
                   help="rounds of noising to --t0 and denoising with the original model")  # fmt: skip
    p.add_argument("--seed", type=int, action=NON_NEGATIVE, default=0, help="seed of the noise the rounds add")
    p.set_defaults(func=_translate)

    for name, command in list(_registry.commands.items()):
        p = sub.add_parser(name, help=command.help)
        try:
            command.add_arguments(p)
        except Exception as error:  # as a broken plugin: the command is left out, the others work
            sub._name_parser_map.pop(name, None)
            sub._choices_actions = [a for a in sub._choices_actions if a.dest != name]
            print(f"diffusionclip: command {name!r} not added: {type(error).__name__}: {error}", file=sys.stderr)
            continue
        _common_args(p)
        p.set_defaults(func=command.run, plugin_command=command)
    return parser


# ---- running ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """Shows every warning as one line, ``diffusionclip <command>: warning: <message>``, on stderr."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"diffusionclip {command}: warning: {_one_line(message)}", file=sys.stderr)

    previous, warnings.showwarning = warnings.showwarning, show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _written_note(args) -> str:
    written = getattr(args, "written", [])
    if not written:
        return "; nothing was written"
    names = ", ".join(written[:3]) + (f" and {len(written) - 3} more" if len(written) > 3 else "")
    return f"; {len(written)} complete file(s) had been written: {names}"


def _error_line(command: str, error: BaseException) -> tuple[str, int]:
    """The one line for ``error`` and the exit status: 2 for the errors a user can fix, 1 for internal errors."""
    kind, prefix = type(error).__name__, f"diffusionclip {command}: error: "
    if isinstance(error, (CLIError, ValueError, TypeError, OSError)):
        return prefix + _one_line(error), 2
    if kind == "NonFiniteLossError":
        return f"{prefix}training diverged: {_one_line(error)} (try a lower --learning-rate)", 2
    if kind == "OutOfMemoryError":
        return f"{prefix}out of memory: {_one_line(error, 200)} (try a smaller --batch-size)", 2
    return (f"diffusionclip {command}: internal error: {kind}: {_one_line(error)} (run with {DEBUG_ENV}=1 for the "
            "traceback)", 1)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Runs ``diffusionclip``; returns 0, 2 after a one-line error (bad usage exits with 2 while parsing), 1 after an
    internal error, 130 after Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.written = []
    with _one_line_warnings(args.command):
        try:
            command = getattr(args, "plugin_command", None)
            if command is not None:
                set_num_threads(args.threads, command.num_threads)
            args.func(args)
        except KeyboardInterrupt:
            if _truthy(os.environ.get(DEBUG_ENV)):
                raise
            print(f"diffusionclip {args.command}: interrupted{_written_note(args)}", file=sys.stderr)
            return 130
        except Exception as error:
            if _truthy(os.environ.get(DEBUG_ENV)):
                raise
            line, status = _error_line(args.command, error)
            written = _written_note(args) if args.written else ""
            print(line + written, file=sys.stderr)
            return status
    return 0


if __name__ == "__main__":
    # `python -m`: this file runs as `__main__`, but plugins register with the module `diffusionclip_pipeline.cli`
    sys.exit(importlib.import_module(__spec__.name).main())

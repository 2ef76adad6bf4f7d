"""``diffusionclip app``: a Gradio web app to fine-tune adapters and edit images with them, offline by default.

Run it with ``diffusionclip app`` or ``python -m diffusionclip_pipeline.commands.app`` (``--model`` as in the other
sub-commands, default ``testbed``; ``--host`` default 127.0.0.1, ``--port`` default 7860) and open the printed
address. Gradio is an optional extra (``pip install -e ".[app]"``) and is imported only when the app is built, so the
package and the CLI work without it.

The work is done by plain functions of an `AppState` (the one pipeline every browser tab shares): `edit_images`,
`finetune_adapter`, `load_adapter`, `export_adapter`, `example_images`; `build_app` only wires them to Gradio
components, and each runs on Gradio's queue. Several users share the pipeline and its adapters; a function that
chooses adapters and then edits holds the UNet's lock (`utils.locking.unet_lock`) for the whole sequence, so another
user's request waits instead of changing the adapters in between. Nothing reaches the network: analytics are off
(``GRADIO_ANALYTICS_ENABLED=False`` before gradio is imported), there is no share link and no server-side rendering,
and gradio serves its own bundled frontend and fonts. The module is also the CLI plugin that adds the ``app``
sub-command (entry point ``app`` of ``diffusionclip_pipeline.plugins``, see `diffusionclip_pipeline.commands`); it
reads the registered models through `registry.registered_models` and their defaults through `defaults`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import inspect
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING

from .app_limits import AppLimits, FinetuneStopped
from .app_serve import SHUTDOWN_SECONDS, Lifecycle, exit_on_sigterm, serve, stop_guard, tracked, uploads_into
from .errors import CLIError
from .loading import load_pipeline
from .options import checked
from .registry import register_command, registered_models

if TYPE_CHECKING:
    import PIL.Image

# Only the standard library and the commands' light modules at import: the CLI imports this module (its plugin) for
# every command, so torch, the package's models and gradio are imported by the functions that need them.

__all__ = [
    "AppLimits",
    "AppState",
    "EditResult",
    "FinetuneResult",
    "add_arguments",
    "build_app",
    "delete_adapter",
    "edit_images",
    "example_images",
    "export_adapter",
    "finetune_adapter",
    "launch",
    "load_adapter",
    "main",
    "register",
    "run",
]

TESTBED = "testbed"
DEFAULT_PORT = 7860
INSTALL_HINT = 'the app needs gradio: pip install "diffusionclip-pipeline[app]" (in a clone: pip install -e ".[app]")'


# ---- the shared state ----------------------------------------------------------------------------------------------


@dataclass
class AppState:
    """What every browser tab shares: the pipeline (with its loaded adapters), the settings recommended for its model,
    the model's renderer of example images (``render(prompt, n, seed)``, a plugin's, or `None`), the folders a
    web user may load adapters from by path (``adapter_roots``; the app's temporary folder is always one), the bounds
    on every request (`AppLimits`), the adapters no request may delete (``protected``: those the model came with),
    a temporary work folder (exports, extracted zips; when served by `run`, also gradio's uploads), removed by
    `close` or with the state, and the requests in flight (``lifecycle``: `app_serve.Lifecycle`)."""

    pipe: object
    model: str = TESTBED
    edit_defaults: dict = field(default_factory=dict)
    finetune_defaults: dict = field(default_factory=dict)
    render: Callable | None = None
    adapter_roots: tuple[str, ...] = ()
    limits: AppLimits = field(default_factory=AppLimits)
    protected: frozenset = frozenset()
    _workdir: tempfile.TemporaryDirectory = field(
        default_factory=lambda: tempfile.TemporaryDirectory(prefix="diffusionclip-app-"), repr=False
    )
    lifecycle: Lifecycle = field(default_factory=Lifecycle, init=False, repr=False)

    @classmethod
    def load(
        cls, model: str = TESTBED, clip: str | None = None, device: str | None = None, set_threads: bool = True,
        adapter_roots=(), limits: AppLimits | None = None,
    ) -> AppState:  # fmt: skip
        """The pipeline of ``--model`` (a registered name such as ``testbed``, a folder or a hub id), with the
        ``finetune`` / ``edit`` settings and the image renderer its plugin registered (none for folders and hub ids).
        A registered model's recommended CPU thread count is applied (``set_threads``) unless ``OMP_NUM_THREADS``
        is set. The adapters the model came with are ``protected``."""
        pipe = load_pipeline(model, clip, device)
        pipe.set_progress_bar_config(disable=True)
        common = dict(adapter_roots=tuple(adapter_roots), limits=limits or AppLimits(),
                      protected=frozenset(pipe.lora_adapters))  # fmt: skip
        registered = registered_models().get(model)
        if registered is None:
            return cls(pipe, model, **common)
        threads = registered.num_threads
        if threads and set_threads and "OMP_NUM_THREADS" not in os.environ:
            import torch

            torch.set_num_threads(threads)
        finetune, edit = (dict(registered.settings(kind)) for kind in ("finetune", "edit"))
        return cls(pipe, model, edit, finetune, registered.render, **common)

    @property
    def workdir(self) -> str:
        return self._workdir.name

    def close(self, timeout: float = SHUTDOWN_SECONDS) -> bool:
        """Refuses new requests, stops a running fine-tune at its next step, waits for the requests in flight (at most
        ``timeout`` seconds) and removes the work folder; returns whether no request was left running."""
        self.lifecycle.closing.set()
        idle = self.lifecycle.wait_idle(timeout)
        self._workdir.cleanup()
        return idle

    @property
    def adapters(self) -> list[str]:
        return list(self.pipe.lora_adapters)

    def edit_settings(self, t0: int | None = None) -> dict:
        """`edit`'s step settings: the pipeline's defaults, under the model's recommended ones, under ``t0``."""
        from ..utils.checks import check_int
        from .defaults import edit_defaults

        settings = {**edit_defaults("t0", "num_inversion_steps", "num_inference_steps"), **self.edit_defaults}
        if t0 is not None:
            settings["t0"] = check_int(t0, "t0", minimum=1, maximum=self.pipe.num_train_timesteps - 1)
        return settings


# ---- what the app does, as plain functions --------------------------------------------------------------------------


@dataclass
class EditResult:
    """One edit request: per image, the input as the model sees it (cropped, resized), the reconstruction (the edit
    with ``edit_strength=0``) and the edit, all PIL images of the model's size."""

    before: list[PIL.Image.Image]
    reconstruction: list[PIL.Image.Image]
    after: list[PIL.Image.Image]
    notes: list[str] = field(default_factory=list)  # what the inputs lost on the way to the model (transparency, ...)

    def strips(self) -> list[PIL.Image.Image]:
        """One image per input: input | reconstruction | edit, side by side."""
        from ..image_io import image_grid

        return [image_grid([list(row)]) for row in zip(self.before, self.reconstruction, self.after)]


def _images(images, limits: AppLimits, notes: list[str] | None = None) -> list[PIL.Image.Image]:
    """The images as the model takes them (`image_io.read_image`: upright, 16-bit grey kept, transparency onto white)
    from PIL images, file paths or Gradio gallery items ``(image, caption)``: at most ``limits.max_images`` of at
    most ``limits.max_image_pixels`` each (checked before decoding). What an image loses is appended to ``notes``."""
    import PIL.Image

    from ..image_io import as_model_input, read_image

    items = list(images or [])
    if len(items) > limits.max_images:
        raise ValueError(f"At most {limits.max_images} images per request, got {len(items)}.")
    notes = [] if notes is None else notes
    result = []
    for i, item in enumerate(items):
        item = item[0] if isinstance(item, (tuple, list)) else item
        name = f"image {i + 1}"
        if isinstance(item, (str, os.PathLike)):
            try:
                result.append(read_image(os.fspath(item), limits.max_image_pixels, notes.append))
            except OSError as error:  # the message names the server's temporary file
                reason = str(error).split(": ", 1)[-1] if "pixels, more than" in str(error) else "not a readable image"
                raise ValueError(f"{name} cannot be used: {reason}.") from error
        elif isinstance(item, PIL.Image.Image):
            if item.width * item.height > limits.max_image_pixels:
                raise ValueError(f"{name} has {item.width}x{item.height} pixels, more than the "
                                 f"{limits.max_image_pixels} allowed.")  # fmt: skip
            result.append(as_model_input(item, name, notes.append))
        else:
            raise TypeError(f"{name} must be an image file or a PIL image, got {type(item).__name__}.")
    return result


def _bounded(value, name: str, maximum: float, minimum: float | None = None) -> float:
    from ..utils.checks import check_number

    return check_number(value, name, -maximum if minimum is None else minimum, maximum)


@tracked
def edit_images(
    state: AppState,
    images,
    adapter: str | None = None,
    edit_strength: float = 1.0,
    t0: int | None = None,
    second_adapter: str | None = None,
    weight: float = 1.0,
    second_weight: float = 1.0,
) -> EditResult:
    """Edits ``images`` with ``adapter`` at ``edit_strength``, and reconstructs them for comparison.

    Each image is inverted once to ``t0`` (default: the model's recommended edit depth); from the same ``x_t0`` the
    reconstruction is `edit` with ``edit_strength=0.0`` and the edit is `edit` with ``adapter`` alone active and
    ``edit_strength``. With a ``second_adapter`` the two are combined (`edit` ``adapters={adapter: r * weight,
    second_adapter: r * second_weight}``, r the edit strength, so strength 0 is again the reconstruction). Without
    an adapter, the edit is the reconstruction.
    """
    from ..image_processing import postprocess_image
    from ..loaders.lora_state import using_adapters
    from ..utils.locking import unet_lock

    notes = []
    images = _images(images, state.limits, notes)
    if not images:
        raise ValueError("Upload an image (or pick examples) to edit.")
    top = state.limits.max_edit_weight
    edit_strength = _bounded(edit_strength, "edit_strength", top)
    weight, second_weight = _bounded(weight, "weight", top), _bounded(second_weight, "second_weight", top)
    if second_adapter is not None and (adapter is None or second_adapter == adapter):
        raise ValueError(f"Choose two different adapters to combine, got {adapter!r} and {second_adapter!r}.")
    pipe, settings = state.pipe, state.edit_settings(t0)
    with unet_lock(pipe.denoiser):  # the adapters chosen here stay as they are until both edits are done
        for name in (adapter, second_adapter):
            if name is not None and name not in state.adapters:
                raise ValueError(f"No adapter named {name!r} is loaded; loaded: {state.adapters}.")
        inversion = pipe.invert(
            images, t0=settings["t0"], num_inversion_steps=settings["num_inversion_steps"],
            num_fixed_point_iterations=settings.get("num_fixed_point_iterations", 0),
        )  # fmt: skip
        common = dict(latents=inversion.x_t0, t0=settings["t0"], num_inference_steps=settings["num_inference_steps"])
        reconstruction = pipe.edit(edit_strength=0.0, **common).images
        if adapter is None:
            edited = reconstruction
        elif second_adapter is None:
            with using_adapters(pipe.denoiser, [adapter]):
                edited = pipe.edit(edit_strength=edit_strength, **common).images
        else:
            mix = {adapter: edit_strength * weight, second_adapter: edit_strength * second_weight}
            edited = pipe.edit(adapters=mix, **common).images
    return EditResult(postprocess_image(inversion.image, "pil"), reconstruction, edited, notes)


@dataclass
class FinetuneResult:
    """A fine-tuning request: the new adapter's name, the loss of every step, and its folder as a zip file."""

    adapter_name: str
    loss_history: list[float]
    zip_path: str
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        losses = self.loss_history
        return (
            f"Adapter **{self.adapter_name}**: loss {losses[0]:.4f} → {losses[-1]:.4f} over {len(losses)} steps "
            f"(lowest {min(losses):.4f})."
        )


class _NullFile:
    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def _reporting_bar(report: Callable, iterable=None, total=None, desc: str | None = None):
    """A tqdm bar (what `pipe.progress_bar` returns, so every tqdm method works) that draws nothing and calls
    ``report(done, total, postfix)`` after every step; ``postfix`` is what `finetune` shows (``postfix["loss"]``)."""
    from tqdm.auto import tqdm

    class ReportingBar(tqdm):
        def __init__(self, *args, **kwargs):
            self.postfix_values = {}
            super().__init__(*args, file=_NullFile(), mininterval=0, miniters=1, **kwargs)

        def update(self, n=1):
            shown = super().update(n)
            report(self.n, self.total, self.postfix_values)
            return shown

        def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
            self.postfix_values = {**(ordered_dict or {}), **kwargs}
            super().set_postfix(ordered_dict, refresh, **kwargs)

    return ReportingBar(iterable, total=total)


@contextlib.contextmanager
def _progress_to(pipe, report: Callable | None):
    """Routes ``pipe``'s progress bars to ``report`` for the block, holding the UNet's lock (every pipeline call
    holds it too, so no other request runs, or sees the replaced bars, meanwhile)."""
    from ..utils.locking import unet_lock

    if report is None:
        yield
        return
    with unet_lock(pipe.denoiser):
        pipe.progress_bar = functools.partial(_reporting_bar, report)
        try:
            yield
        finally:
            del pipe.progress_bar  # the class's method again


def _new_name(state: AppState, wanted: str | None, fallback: str) -> str:
    """``wanted`` as an adapter name (letters, digits, ``_``, ``-``), or ``fallback`` made unique among loaded ones."""
    if wanted and wanted.strip():
        return wanted.strip()
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", fallback).strip("_")[:40] or "adapter"
    name, k = base, 2
    while name in state.adapters:
        name, k = f"{base}_{k}", k + 1
    return name


@tracked
def finetune_adapter(
    state: AppState,
    images,
    prompt_src: str,
    prompt_tar: str,
    num_epochs: int | None = None,
    learning_rate: float | None = None,
    lora_rank: int | None = None,
    adapter_name: str | None = None,
    report: Callable | None = None,
    stop: threading.Event | None = None,
    **settings,
) -> FinetuneResult:
    """Fine-tunes a new adapter ``prompt_src`` → ``prompt_tar`` on ``images`` with the model's recommended settings
    under the given ones (LoRA alpha = rank, scale 1, as the CLI does: `defaults.rank_settings`), and exports it
    (`export_adapter`, with up to four of the images in its card's before/after grid). Without images it trains on
    8 images of ``prompt_src`` that the model's renderer draws (as the CLI does), or, for a model without one, on
    images sampled from it.

    ``num_epochs``, ``learning_rate``, ``lora_rank``, the images and the number of loaded adapters are bounded by
    ``state.limits``. ``report(done, total, postfix)`` is called after every step (``postfix["loss"]``: the latest
    loss). Setting ``stop`` (or running longer than ``state.limits.max_finetune_seconds``) stops the run at its next
    step with `FinetuneStopped`, as does closing the app (`AppState.close`); the run then discards its adapter and
    restores the previous ones."""
    from ..utils.checks import check_int
    from ..utils.locking import unet_lock
    from .defaults import rank_settings

    limits, notes = state.limits, []
    given = dict(num_epochs=num_epochs, learning_rate=learning_rate, lora_rank=lora_rank, **settings)
    for key in ("num_epochs", "lora_rank"):  # sliders and number boxes send floats
        if isinstance(given.get(key), float) and given[key].is_integer():
            given[key] = int(given[key])
    if num_epochs is not None:
        check_int(given["num_epochs"], "num_epochs", minimum=1, maximum=limits.max_epochs)
    if lora_rank is not None:
        check_int(given["lora_rank"], "lora_rank", minimum=1, maximum=limits.max_lora_rank)
    if learning_rate is not None:
        _bounded(learning_rate, "learning_rate", limits.max_learning_rate, minimum=0.0)
    images = _images(images, limits, notes) or (example_images(state, prompt_src, 8) if state.render else [])
    config = {**state.finetune_defaults, **{k: v for k, v in given.items() if v is not None}}
    if lora_rank is not None:
        config.update(rank_settings(given["lora_rank"]))
    guard = stop_guard(report, stop, limits.max_finetune_seconds, state.lifecycle.closing)
    with unet_lock(state.pipe.denoiser):  # the name is free until the adapter exists
        _check_room(state)
        name = _new_name(state, adapter_name, prompt_tar or "adapter")
        with _progress_to(state.pipe, guard):
            output = state.pipe.finetune(prompt_src, prompt_tar, images=images or None, adapter_name=name, **config)
        zip_path = export_adapter(state, name, example_images=images[:4] or None)
    return FinetuneResult(name, list(output.loss_history), zip_path, notes)


def _check_room(state: AppState) -> None:
    if len(state.adapters) >= state.limits.max_adapters:
        raise ValueError(f"{len(state.adapters)} adapters are loaded, the most this app holds: delete one first.")


@tracked
def export_adapter(state: AppState, adapter_name: str, example_images=None) -> str:
    """Saves ``adapter_name`` (weights, model card, before/after grid of ``example_images``) into the state's
    temporary folder and returns it zipped (``<adapter_name>.zip``); the adapter's previous export is replaced."""
    from .app_limits import remove_tree

    if adapter_name not in state.adapters:
        raise ValueError(f"No adapter named {adapter_name!r} is loaded; loaded: {state.adapters}.")
    export = os.path.join(state.workdir, f"export-{adapter_name}")
    remove_tree(export)  # gradio serves a copy of what it was given: the previous export is no longer needed
    os.makedirs(export)
    folder = os.path.join(export, adapter_name)
    state.pipe.save_lora_weights(
        folder, adapter_name=adapter_name, example_images=_images(example_images, state.limits) or None,
        example_edit_kwargs=state.edit_settings() if example_images else None,
    )  # fmt: skip
    return shutil.make_archive(folder, "zip", root_dir=export, base_dir=adapter_name)


@tracked
def load_adapter(state: AppState, path: str, adapter_name: str | None = None, uploaded: bool = False) -> str:
    """Loads an adapter from a folder, a ``pytorch_lora_weights.safetensors`` file, or a zip the app exported (only
    its weights file is extracted); returns its name (default: from its target prompt, else its file name).

    ``path`` must lie inside the state's ``adapter_roots`` or its temporary folder (`app_limits.adapter_source`: a
    regular file or folder, at most ``limits.max_file_bytes``; one message for "not found" and "not allowed"), unless
    it is ``uploaded`` (a file Gradio received; it must be a regular file of that size too)."""
    from ..loaders.lora_file import LORA_WEIGHT_NAME, read_adapter_file
    from ..utils.locking import unet_lock
    from .app_limits import adapter_source, checked_upload, is_zip, remove_tree, weights_from_zip

    if not path or not str(path).strip():
        raise ValueError("Give an adapter folder, a .safetensors file or an exported .zip.")
    if uploaded:
        source = checked_upload(path, state.limits)
    else:
        source = adapter_source(path, (*state.adapter_roots, state.workdir), state.limits, LORA_WEIGHT_NAME)
    _check_room(state)
    extracted = None
    try:
        if is_zip(source):
            extracted = tempfile.mkdtemp(prefix="upload-", dir=state.workdir)
            target = os.path.join(extracted, LORA_WEIGHT_NAME)
            source = weights_from_zip(source, target, state.limits, LORA_WEIGHT_NAME)
        named = os.path.dirname(source) if source.endswith(LORA_WEIGHT_NAME) else source
        fallback = read_adapter_file(source).provenance.get("prompt_tar") or os.path.basename(named)
        with unet_lock(state.pipe.denoiser):
            _check_room(state)
            name = _new_name(state, adapter_name, os.path.splitext(str(fallback))[0])
            return state.pipe.load_lora_weights(source, adapter_name=name, keep_active=True)
    finally:
        if extracted is not None:
            remove_tree(extracted)


@tracked
def delete_adapter(state: AppState, adapter_name: str) -> None:
    """Removes ``adapter_name`` from the shared pipeline (and its export), unless it is one the model came with
    (``state.protected``)."""
    from ..utils.locking import unet_lock
    from .app_limits import remove_tree

    with unet_lock(state.pipe.denoiser):
        if adapter_name not in state.adapters:
            raise ValueError(f"No adapter named {adapter_name!r} is loaded; loaded: {state.adapters}.")
        if adapter_name in state.protected:
            raise ValueError(f"{adapter_name!r} came with the model and cannot be deleted here.")
        state.pipe.delete_adapters(adapter_name)
    remove_tree(os.path.join(state.workdir, f"export-{adapter_name}"))


@tracked
def example_images(state: AppState, prompt: str, n: int = 4, seed: int = 0) -> list[PIL.Image.Image]:
    """``n`` example images of ``prompt`` drawn by the model's renderer (the test-bed renders the colour and shape
    a prompt names, e.g. "red circle"); `ValueError` when the model has none or it cannot draw ``prompt``."""
    from ..utils.checks import check_int

    if state.render is None:
        raise ValueError(f"--model {state.model} has no renderer of example images: upload images instead.")
    return list(state.render(prompt, check_int(n, "n", minimum=1), check_int(seed, "seed", minimum=0)))


# ---- the Gradio app ---------------------------------------------------------------------------------------------


def _gradio():
    """gradio, imported with analytics off (its version check would otherwise reach the network)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio
    except ImportError as error:
        raise CLIError(INSTALL_HINT) from error
    return gradio


def _user_error(gr, name: str, error: BaseException):
    """The `gr.Error` for ``error`` (logged as one line, not a traceback)."""
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, FloatingPointError):  # training.NonFiniteLossError
        message = f"Training diverged: {message} (try a lower learning rate); no adapter was added."
    print(f"diffusionclip app: {name}: {message}", file=sys.stderr)
    return gr.Error(message, print_exception=False)


_USER_ERRORS = (ValueError, TypeError, OSError, FloatingPointError, FinetuneStopped)


def _user_errors(fn: Callable) -> Callable:
    """Shows a `ValueError`, `TypeError`, `OSError`, a diverged run or a stopped one of ``fn`` (a function or a
    coroutine function) as a Gradio error message (the request ends)."""
    gr = _gradio()

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def async_wrapper(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except _USER_ERRORS as error:
                raise _user_error(gr, fn.__name__, error) from error

        return async_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _USER_ERRORS as error:
            raise _user_error(gr, fn.__name__, error) from error

    return wrapper


NO_ADAPTER = "(none)"
# small models' images, enlarged without blur; the reconstruction fills its box as the slider does
CSS = (
    ".pixelated img { image-rendering: pixelated; }\n"
    "#reconstruction img { width: 100%; height: 100%; object-fit: contain; }"
)


def _adapter_choices(state: AppState, selected: str | None = None, second_selected: str | None = None):
    """Updates of the two adapter menus and the combination controls (shown when two adapters are loaded)."""
    gr = _gradio()
    names = state.adapters
    first = selected if selected in names else (names[0] if names else None)
    second = gr.update(choices=[NO_ADAPTER, *names], value=second_selected if second_selected in names else NO_ADAPTER)
    return gr.update(choices=names, value=first), second, gr.update(visible=len(names) >= 2)


def _edit_outputs(result: EditResult, index: int, slider: bool) -> list:
    """The before/after view (one slider, or two images) and the reconstruction of image ``index``."""
    before, after = result.before[index], result.after[index]
    return [(before, after) if slider else before, *([] if slider else [after]), result.reconstruction[index]]


def _layout(state: AppState, gr) -> SimpleNamespace:
    """The app's components (inside an open `gr.Blocks`), by name."""
    ui, testbed = SimpleNamespace(), state.model == TESTBED
    pixelated = ["pixelated"] if state.pipe.denoiser.config.sample_size <= 128 else []
    image = dict(type="pil", format="png", elem_classes=pixelated)  # png: lossless, unlike gradio's default webp
    gr.Markdown(f"# DiffusionCLIP · `{state.model}`\nText-guided editing with LoRA adapters (arXiv 2110.02711).")
    with gr.Row():
        with gr.Column():
            files = {**image, "type": "filepath"}  # the app reads them itself: bounded, 16-bit aware
            ui.images = gr.Gallery(label="Images", interactive=True, columns=4, height=240, elem_id="images", **files)
            with gr.Row(visible=state.render is not None, equal_height=True):
                ui.example_prompt = gr.Textbox(label="Examples of", value="red circle" if testbed else "", scale=3)
                ui.examples = gr.Button("Render examples", scale=1, elem_id="examples")
            # the menus list the shared pipeline's adapters, refreshed when opened; the server checks every name
            # itself (gradio would refuse a name another tab added since this one's last refresh)
            menu = dict(allow_custom_value=True)
            ui.adapter = gr.Dropdown(label="Adapter", choices=state.adapters, elem_id="adapter", **menu)
            with gr.Row(visible=len(state.adapters) >= 2) as ui.combine:
                ui.second = gr.Dropdown(label="Combine with", choices=[NO_ADAPTER, *state.adapters], value=NO_ADAPTER,
                                        **menu)  # fmt: skip
                ui.weight = gr.Slider(-1.0, 2.0, value=0.5, step=0.05, label="Weight of the adapter")
                ui.second_weight = gr.Slider(-1.0, 2.0, value=0.5, step=0.05, label="Weight of the second")
            ui.strength = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="Edit strength", elem_id="strength")
            ui.t0 = gr.Slider(1, state.pipe.num_train_timesteps - 1, value=state.edit_settings()["t0"], step=1,
                              label="Inversion depth t0", elem_id="t0")  # fmt: skip
            ui.edit = gr.Button("Edit", variant="primary", elem_id="edit")
        with gr.Column():
            with gr.Row(equal_height=True):
                if hasattr(gr, "ImageSlider"):
                    ui.views = [gr.ImageSlider(label="Before / after", elem_id="before-after", height=300, **image)]
                else:  # an older gradio
                    ui.views = [gr.Image(label=label, elem_id=label.lower(), height=300, **image)
                                for label in ("Before", "After")]  # fmt: skip
                ui.reconstruction = gr.Image(label="Reconstruction (edit strength 0)", elem_id="reconstruction",
                                             height=300, **image)  # fmt: skip
            ui.strips = gr.Gallery(label="Every image: input | reconstruction | edit (click: show above)", columns=2,
                                   height=260, object_fit="contain", format="png", elem_id="strips",
                                   elem_classes=pixelated)  # fmt: skip
    _adapter_tabs(state, gr, ui, testbed)
    ui.results, ui.seed = gr.State(), gr.State(0)
    return ui


def _adapter_tabs(state: AppState, gr, ui: SimpleNamespace, testbed: bool) -> None:
    from .defaults import finetune_defaults

    defaults = {**finetune_defaults("num_epochs", "learning_rate", "lora_rank"), **state.finetune_defaults}
    with gr.Accordion("Adapters: fine-tune a new one, load one, download one", open=not state.adapters):
        with gr.Tab("Fine-tune"):
            with gr.Row():
                ui.src = gr.Textbox(label="Source prompt", value="red circle" if testbed else "face")
                ui.tar = gr.Textbox(label="Target prompt", value="blue circle" if testbed else "smiling face")
                ui.name = gr.Textbox(label="Adapter name (optional)")
            with gr.Row():
                ui.epochs = gr.Number(label="Epochs", value=defaults["num_epochs"], precision=0, minimum=1)
                ui.lr = gr.Number(label="Learning rate", value=defaults["learning_rate"], minimum=0)
                ui.rank = gr.Number(label="LoRA rank", value=defaults["lora_rank"], precision=0, minimum=1)
            with gr.Row():
                ui.finetune = gr.Button("Fine-tune on the images above", elem_id="finetune", scale=3)
                ui.stop = gr.Button("Stop", elem_id="stop", scale=1)
            ui.loss = gr.Markdown()
            ui.download = gr.File(label="The adapter (zip: weights, model card, before/after grid)")
        with gr.Tab("Load"):
            ui.path = gr.Textbox(label="Adapter folder, .safetensors file or exported .zip on the server")
            ui.upload = gr.File(label="…or upload a .safetensors / .zip", file_types=[".safetensors", ".zip"])
            ui.load = gr.Button("Load")
        with gr.Tab("Download or delete"):
            with gr.Row():
                ui.export = gr.Button("Download the selected adapter")
                ui.delete = gr.Button("Delete the selected adapter", variant="stop")
            ui.exported = gr.File(label="The adapter (zip)")
    ui.menus = [ui.adapter, ui.second, ui.combine]


def _wire(state: AppState, gr, ui: SimpleNamespace, demo) -> None:
    """Connects the components to the app's functions (each a queued event)."""
    slider = len(ui.views) == 1
    none = lambda value: None if value in (None, "", NO_ADAPTER) else value  # noqa: E731

    def on_edit(images, adapter, strength, t0, second, weight, second_weight):
        result = edit_images(state, images, none(adapter), strength, t0, none(second), weight, second_weight)
        for note in result.notes:
            gr.Warning(note)
        return [*_edit_outputs(result, 0, slider), result.strips(), result]

    def on_select(result: EditResult | None, event):
        if result is None:
            return [gr.update()] * (len(ui.views) + 1)
        return _edit_outputs(result, event.index, slider)

    on_select.__annotations__["event"] = gr.SelectData  # gradio passes event data by this annotation (a string here)

    async def on_finetune(images, src, tar, epochs, lr, rank, name, progress=gr.Progress()):  # noqa: B008
        def report(done, total, postfix):
            loss = postfix.get("loss")
            progress((done, total), desc=f"fine-tuning, loss {loss}" if loss else "inverting the images")

        stop = threading.Event()  # set when gradio cancels this request: the run stops at its next step
        try:
            result = await asyncio.to_thread(finetune_adapter, state, images, src, tar, epochs, lr, rank, none(name),
                                             report=report, stop=stop)  # fmt: skip
        except asyncio.CancelledError:
            stop.set()
            print("diffusionclip app: on_finetune: cancelled; the run stops at its next step", file=sys.stderr)
            raise
        for note in result.notes:
            gr.Warning(note)
        return [result.summary(), result.zip_path, *_adapter_choices(state, result.adapter_name)]

    def on_load(path, upload, name):
        if upload:
            return _adapter_choices(state, load_adapter(state, upload, none(name), uploaded=True))
        return _adapter_choices(state, load_adapter(state, path, none(name)))

    def on_delete(adapter):
        delete_adapter(state, none(adapter) or "")
        return _adapter_choices(state)

    def on_examples(prompt, seed):  # each click draws new ones
        return example_images(state, prompt, 4, seed), seed + 1

    def on_export(adapter):
        return export_adapter(state, none(adapter) or "")

    views = [*ui.views, ui.reconstruction]
    edit_inputs = [ui.images, ui.adapter, ui.strength, ui.t0, ui.second, ui.weight, ui.second_weight]
    ui.edit.click(_user_errors(on_edit), edit_inputs, [*views, ui.strips, ui.results], api_name="edit")
    ui.strips.select(on_select, [ui.results], views, api_visibility="private")
    finetune_inputs = [ui.images, ui.src, ui.tar, ui.epochs, ui.lr, ui.rank, ui.name]
    finetune_outputs = [ui.loss, ui.download, *ui.menus]
    training = ui.finetune.click(_user_errors(on_finetune), finetune_inputs, finetune_outputs, api_name="finetune")
    ui.stop.click(None, None, None, cancels=[training], api_name="stop_finetune", queue=False)
    ui.load.click(_user_errors(on_load), [ui.path, ui.upload, ui.name], ui.menus, api_name="load_adapter")
    ui.export.click(_user_errors(on_export), [ui.adapter], ui.exported, api_name="download_adapter")
    ui.delete.click(_user_errors(on_delete), [ui.adapter], ui.menus, api_name="delete_adapter")
    ui.examples.click(_user_errors(on_examples), [ui.example_prompt, ui.seed], [ui.images, ui.seed],
                      api_name="examples")  # fmt: skip
    demo.load(lambda: _adapter_choices(state), None, ui.menus, api_visibility="private")  # a new tab: every adapter
    for menu in (ui.adapter, ui.second):  # adapters another tab added or deleted since
        menu.focus(lambda first, second: _adapter_choices(state, first, second), [ui.adapter, ui.second], ui.menus,
                   api_visibility="private", queue=False, show_progress="hidden")  # fmt: skip


def build_app(state: AppState):
    """The Gradio `Blocks` app over ``state``, queued (not launched: see `launch`)."""
    gr = _gradio()
    age = max(1, int(state.limits.max_work_age_seconds))  # gradio's copies of uploads and downloads, removed by age
    with gr.Blocks(title="DiffusionCLIP", analytics_enabled=False, delete_cache=(age, age)) as demo:
        _wire(state, gr, _layout(state, gr), demo)
    demo.queue(default_concurrency_limit=1)
    demo.app_state = state  # `launch` reads its limits
    return demo


def launch(demo, host: str = "127.0.0.1", port: int | None = DEFAULT_PORT, block: bool = True):
    """Starts the app's server offline (no share link, no server-side rendering); returns gradio's
    ``(app, local_url, share_url)``. ``block=False`` returns at once (tests; stop it with ``demo.close()``); else it
    serves until SIGINT or SIGTERM, then shuts down cleanly and exits with 130 or 143 (`app_serve.serve`).

    Gradio's own start-up lines are silenced: they advise ``share=True``, which this offline app never uses (see
    docs/app.md for exposing it); the URL is printed here instead."""
    state = getattr(demo, "app_state", None)
    limits = state.limits if state is not None else AppLimits()
    result = demo.launch(
        server_name=host, server_port=port, share=False, ssr_mode=False, prevent_thread_lock=True,
        inbrowser=False, mcp_server=False, quiet=True, css=CSS, footer_links=["api", "settings"],
        max_file_size=limits.max_file_bytes,
    )  # fmt: skip
    if block:
        print(f"diffusionclip app: running on {result[1]} (Ctrl-C stops it)", flush=True)
        serve(demo, state) if state is not None else demo.block_thread()
    return result


# ---- the command ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=TESTBED, help="hub id, pipeline/DDPM folder or registered name (default: testbed, offline)"
    )
    parser.add_argument("--clip", default=None, help="CLIP id or folder if the model has none")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})",
                        action=checked(_check_port))  # fmt: skip
    parser.add_argument("--adapter-root", action="append", default=[], metavar="FOLDER",
                        help="a folder whose adapters a user may load by path on the server (repeatable; default: "
                             "none, only uploads)")  # fmt: skip


def _check_port(value, name: str) -> int:
    from ..utils.checks import check_int

    return check_int(value, name, minimum=1, maximum=65535)


def run(args: argparse.Namespace) -> None:
    """``diffusionclip app``: loads the model, builds the app and serves it until interrupted."""
    _gradio()  # fail before loading the model when gradio is missing
    for root in args.adapter_root:
        if not os.path.isdir(root):
            raise CLIError(f"--adapter-root {root}: not a folder")
    with exit_on_sigterm():  # until `launch` handles signals itself: the work folder is removed all the same
        state = AppState.load(args.model, args.clip, args.device, set_threads=getattr(args, "threads", None) is None,
                              adapter_roots=args.adapter_root)  # fmt: skip
        try:
            uploads_into(state.workdir)
            print(f"diffusionclip app: serving --model {args.model} at http://{args.host}:{args.port} (Ctrl-C stops)")
            launch(build_app(state), host=args.host, port=args.port)
        finally:
            state.close()


def register() -> None:
    """The CLI plugin (entry point ``app``): adds the ``app`` sub-command (gradio is imported only when it runs)."""
    register_command("app", help="a web app (Gradio) to fine-tune adapters and edit images; offline by default",
                     add_arguments=add_arguments, run=run)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """``python -m diffusionclip_pipeline.commands.app [options]``: exactly ``diffusionclip app [options]``."""
    from .main import main as diffusionclip
    from .registry import load_plugins

    load_plugins()
    with contextlib.suppress(ValueError):  # registered already, unless the package's entry points are not installed
        register()
    return diffusionclip(["app", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

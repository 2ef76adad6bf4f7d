"""Evaluation of edits and reconstructions: directional CLIP similarity (DiffusionCLIP Sec. 4), MAE, SSIM and a
CLIP score; the scores of a pipeline's edits (`evaluate_edit`, which fine-tuning's validation uses) and a sweep over
edit strength and inversion depth (`sweep`).

The functions take images in any form `DiffusionCLIPPipeline.invert` accepts (PIL, numpy, torch in [0, 1]; single
or lists) and work for real models as for the test-bed. Non-square images are centre-cropped.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput

from .choices import ENCODINGS, INVERSION_STARTS
from .image_io import image_grid
from .image_processing import PreparedImages, postprocess_image, preprocess_image
from .training.data import inverted_batches
from .training.losses import CLIPDirectionalLoss
from .utils.checks import check_choice, check_number, check_positive_int, check_prompt, check_timestep, short_repr


def _side(images) -> int:
    first = images[0] if isinstance(images, (list, tuple)) else images
    if isinstance(first, PIL.Image.Image):
        return min(first.size)
    if isinstance(first, np.ndarray):
        return min(first.shape[-3:-1]) if first.ndim >= 3 else min(first.shape)
    if torch.is_tensor(first):
        return min(first.shape[-2:])
    raise TypeError(f"Images must be PIL images, numpy arrays or tensors, got {type(first).__name__}.")


def _as_unit(images, name: str, size: int | None = None) -> torch.Tensor:
    """[0, 1] float NCHW (3 channels) at ``size`` (the images' own size by default)."""
    return (preprocess_image(images, size or _side(images), name=name) + 1) / 2


def _two_sets(images, reference) -> tuple[torch.Tensor, torch.Tensor]:
    x = _as_unit(images, "images")
    y = _as_unit(reference, "reference", x.shape[-1])
    if x.shape != y.shape:
        raise ValueError(f"`images` and `reference` differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}.")
    return x, y


def mean_absolute_error(images, reference) -> float:
    """Mean absolute pixel difference on the [0, 1] scale (the paper's reconstruction MAE)."""
    x, y = _two_sets(images, reference)
    return (x - y).abs().mean().item()


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim(images, reference, window_size: int = 11, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al., 2004) on [0, 1] images: Gaussian window, C1 = 0.01², C2 = 0.03².

    Computed per channel over the valid region (no padding) and averaged; for images smaller than the window the
    window shrinks to the image size (odd).
    """
    return _ssim(*_two_sets(images, reference), window_size, sigma)


def _ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> float:
    x, y = x.double(), y.double()  # E[x^2] - E[x]^2 cancels badly in float32
    size = min(window_size, x.shape[-1] - (1 - x.shape[-1] % 2))
    window = _gaussian_window(size, sigma).to(x)[None, None].repeat(x.shape[1], 1, 1, 1)

    def blur(z):
        return F.conv2d(z, window, groups=x.shape[1])

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean().item()


@torch.no_grad()
def directional_clip_similarity(
    loss_fn: CLIPDirectionalLoss, source_images, edited_images, source_text: str, target_text: str
) -> float:
    """Mean cosine between the image change ``E_I(edited) - E_I(source)`` and the text change (the paper's S_dir).

    Args:
        loss_fn ([`CLIPDirectionalLoss`]): Holds the CLIP model, its preprocessing and the prompt templates.
        source_images / edited_images: The images before and after the edit (pairs, same order).
        source_text / target_text (`str`): The edit's prompts.
    """
    return _directional_similarity(loss_fn, *_two_sets(source_images, edited_images), source_text, target_text)


def _directional_similarity(loss_fn, x: torch.Tensor, y: torch.Tensor, source_text: str, target_text: str) -> float:
    """`directional_clip_similarity` of [0, 1] tensors (moved to the CLIP's device)."""
    device = loss_fn.image_mean.device
    x, y = x.to(device), y.to(device)
    direction = loss_fn.text_direction(source_text, target_text)
    image_direction = loss_fn.encode_images(y * 2 - 1) - loss_fn.encode_images(x * 2 - 1)
    return F.cosine_similarity(image_direction, direction[None].to(image_direction), dim=-1).mean().item()


@torch.no_grad()
def clip_score(loss_fn: CLIPDirectionalLoss, images, text: str) -> float:
    """Mean cosine between the CLIP image embeddings of ``images`` and the embedding of ``text`` (its mean over the
    loss's prompt templates, as the text side of the directional loss uses it): how much the images look like ``text``.

    Args:
        loss_fn ([`CLIPDirectionalLoss`]): Holds the CLIP model, its preprocessing and the prompt templates.
        images: The images (any form `DiffusionCLIPPipeline.invert` accepts).
        text (`str`): The text, e.g. the edit's target prompt.
    """
    return _clip_score(loss_fn, _as_unit(images, "images"), text)


def _clip_score(loss_fn, y: torch.Tensor, text: str) -> float:
    embeds = loss_fn.encode_images(y.to(loss_fn.image_mean.device) * 2 - 1)
    target = loss_fn.template_embedding(text)
    return F.cosine_similarity(embeds, target[None].to(embeds), dim=-1).mean().item()


# ---- scoring a pipeline's edits --------------------------------------------------------------------------------

SCORE_NAMES = ("s_dir", "s_dir_2", "mae", "ssim", "clip_score")
HIGHER_IS_BETTER = {"s_dir": True, "s_dir_2": True, "clip_score": True, "ssim": True, "mae": False}
# `edit` arguments that the inversion shared by a sweep's strengths takes too
_INVERSION_KWARGS = ("num_inversion_steps", "num_fixed_point_iterations", "prompt", "encoding", "inversion_start")
# `edit` arguments that `evaluate_edit` / `sweep` set themselves
_OWN_KWARGS = ("image", "output_type", "return_dict")
_SWEPT_KWARGS = ("latents", "t0", "edit_strength", "strength")


def scoring_losses(pipe) -> list[CLIPDirectionalLoss]:
    """One `CLIPDirectionalLoss` per CLIP of ``pipe.clip_models`` (the default CLIP is loaded if the pipeline has
    none), without random views, on the CLIP's device: what the scores are measured with."""
    pipe.require_clip()
    return [CLIPDirectionalLoss(model, tokenizer).to(model.device) for model, tokenizer in pipe.clip_models]


@torch.no_grad()
def score_edits(
    clip_losses: list[CLIPDirectionalLoss], source_images, edited_images, prompt_src: str, prompt_tar: str
) -> dict[str, float]:
    """The scores of a set of edits, each a mean over the images.

    Args:
        clip_losses (`list[CLIPDirectionalLoss]`): One per CLIP (see `scoring_losses`); the first is the main one.
        source_images / edited_images: The images before and after the edit (pairs, same order; any form
            `DiffusionCLIPPipeline.invert` accepts).
        prompt_src / prompt_tar (`str`): The edit's prompts.

    Returns:
        `dict[str, float]`: ``s_dir`` (`directional_clip_similarity` with the first CLIP), ``s_dir_2`` (the same
        with the second CLIP, only when there are two), ``mae`` and ``ssim`` of the edits against their inputs (how
        much of the image the edit kept: `mean_absolute_error`, `ssim`) and ``clip_score`` (`clip_score` of the
        edits and ``prompt_tar``, with the first CLIP).
    """
    if not isinstance(clip_losses, (list, tuple)) or not clip_losses:
        raise ValueError(
            f"`clip_losses` must be a non-empty list of CLIPDirectionalLoss, got {short_repr(clip_losses)}."
        )
    check_prompt(prompt_src, "prompt_src")
    check_prompt(prompt_tar, "prompt_tar")
    x, y = _two_sets(source_images, edited_images)
    scores = {"s_dir": _directional_similarity(clip_losses[0], x, y, prompt_src, prompt_tar)}
    if len(clip_losses) > 1:
        scores["s_dir_2"] = _directional_similarity(clip_losses[1], x, y, prompt_src, prompt_tar)
    scores["mae"] = (x - y).abs().mean().item()
    scores["ssim"] = _ssim(x, y)
    scores["clip_score"] = _clip_score(clip_losses[0], y, prompt_tar)
    return scores


@dataclass
class EditEvaluation(BaseOutput):
    """Output of `evaluate_edit`.

    Args:
        scores (`dict[str, float]`): See `score_edits`.
        images (`torch.Tensor`): The edits, NCHW in [0, 1] (``output_type="pt"``), on the CPU.
        source (`torch.Tensor`): The inputs as the model sees them (centre-cropped and resized), NCHW in [0, 1], on
            the CPU.
    """

    scores: dict
    images: torch.Tensor
    source: torch.Tensor


def _edit_parameters(pipe) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(type(pipe).edit).parameters)


def _check_edit_kwargs(pipe, edit_kwargs: dict, refused: tuple[str, ...]) -> dict:
    """The keyword arguments as `edit` takes them (unknown names and ``refused`` ones are a `TypeError`), with the
    defaults of the ones not given."""
    parameters = _edit_parameters(pipe)
    unknown = sorted(
        k for k in edit_kwargs if k not in parameters or parameters[k].kind is inspect.Parameter.VAR_KEYWORD
    )
    if unknown:
        raise TypeError(f"Unknown `edit` argument(s) {unknown}.")
    taken = sorted(k for k in edit_kwargs if k in refused)
    if taken:
        raise TypeError(f"{taken} are set here, not by the caller: drop them from the keyword arguments.")
    defaults = {k: p.default for k, p in parameters.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **edit_kwargs}


def _check_edit_settings(pipe, images, settings: dict, t0: int, latents=None) -> None:
    """`edit`'s own checks of ``settings`` at ``t0``, before any work."""
    pipe.check_inputs(
        images if latents is None else None, t0, settings["num_inversion_steps"], settings["num_inference_steps"],
        settings["eta"], settings["generator"], latents, "pt", None, settings["num_fixed_point_iterations"],
    )  # fmt: skip
    check_choice(settings["encoding"], "encoding", ENCODINGS)
    check_choice(settings["inversion_start"], "inversion_start", INVERSION_STARTS)


def _batches(n: int, batch_size: int | None):
    size = n if batch_size is None else batch_size
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _sliced(generator, part: slice):
    return generator[part] if isinstance(generator, list) else generator


@torch.no_grad()
def evaluate_edit(
    pipe, images, prompt_src: str, prompt_tar: str, clip_losses: list[CLIPDirectionalLoss] | None = None,
    batch_size: int | None = None, **edit_kwargs,
) -> EditEvaluation:  # fmt: skip
    r"""
    Edits ``images`` with the pipeline as it is (its active adapters) and scores the edits (`score_edits`) against
    the images as the model sees them. Fine-tuning's validation (`finetune(..., validation_images=...)`) calls this.

    Args:
        pipe ([`DiffusionCLIPPipeline`]): The pipeline.
        images: The held-out images (any form `DiffusionCLIPPipeline.invert` accepts).
        prompt_src / prompt_tar (`str`): The edit's prompts.
        clip_losses (`list[CLIPDirectionalLoss]`, *optional*): What to score with; `scoring_losses(pipe)` if `None`.
        batch_size (`int`, *optional*): Images edited at once (all by default).
        **edit_kwargs: Passed to `DiffusionCLIPPipeline.edit` (``t0``, ``num_inference_steps``, ``edit_strength``,
            ``latents`` = precomputed ``x_t0`` of ``images``, ...); ``output_type`` and ``return_dict`` are set here.

    Returns:
        [`EditEvaluation`]: the scores, the edits and the inputs as the model sees them.

    Raises:
        `FloatingPointError`: an edit holds NaN or infinite values (nothing to score).

    Examples:

    ```py
    >>> from diffusionclip_pipeline.evaluation import evaluate_edit

    >>> evaluate_edit(pipe, faces, "face", "smiling face", t0=400).scores
    {'s_dir': 0.21, 'mae': 0.04, 'ssim': 0.83, 'clip_score': 0.27}
    ```
    """
    # 1. Check inputs
    check_prompt(prompt_src, "prompt_src")
    check_prompt(prompt_tar, "prompt_tar")
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")
    settings = _check_edit_kwargs(pipe, edit_kwargs, _OWN_KWARGS)
    latents = edit_kwargs.pop("latents", None)
    x0 = pipe.prepare_image(images, name="images")
    _check_edit_settings(pipe, x0, settings, settings["t0"], latents)
    if latents is not None and latents.shape[0] != x0.shape[0]:
        raise ValueError(f"`latents` holds {latents.shape[0]} images, `images` {x0.shape[0]}.")
    clip_losses = scoring_losses(pipe) if clip_losses is None else clip_losses
    # 2. Edit, batch by batch, and score
    return edit_and_score(pipe, x0, prompt_src, prompt_tar, clip_losses, batch_size, latents, edit_kwargs)


@torch.no_grad()
def edit_and_score(
    pipe, x0: torch.Tensor, prompt_src: str, prompt_tar: str, clip_losses: list[CLIPDirectionalLoss],
    batch_size: int | None, latents: torch.Tensor | None, edit_kwargs: dict,
) -> EditEvaluation:  # fmt: skip
    """`evaluate_edit` of checked arguments: ``x0`` as `pipe.prepare_image` returns it, ``latents`` its ``x_t0`` (or
    `None`: `edit` inverts), ``edit_kwargs`` the other `edit` arguments. Fine-tuning's validation calls this."""
    edited = []
    for part in _batches(x0.shape[0], batch_size):
        kwargs = {**edit_kwargs, "generator": _sliced(edit_kwargs.get("generator"), part)}
        source = {"image": PreparedImages(x0[part])} if latents is None else {"latents": latents[part]}
        edited.append(pipe.edit(**source, **kwargs, output_type="pt").images.float().cpu())
    edited = torch.cat(edited)
    if not bool(torch.isfinite(edited).all()):
        bad = int((~torch.isfinite(edited)).sum())
        raise FloatingPointError(f"The edits hold {bad} non-finite value(s) (NaN or infinity): a diverged adapter?")
    x0 = x0.float().cpu()
    scores = score_edits(clip_losses, x0, edited * 2 - 1, prompt_src, prompt_tar)
    source = postprocess_image(x0, "pt")
    return EditEvaluation(scores=scores, images=edited, source=source)


@dataclass
class SweepOutput(BaseOutput):
    """Output of `sweep`.

    Args:
        table (`list[dict]`): One row per setting, ``t0`` outer and ``edit_strength`` inner: ``{"t0",
            "edit_strength", "s_dir", ("s_dir_2",) "mae", "ssim", "clip_score"}`` (see `score_edits`).
        grid (`PIL.Image.Image`): Rows: the inputs as the model sees them, then the edits of each table row in
            order; columns: the images.
        images (`list[torch.Tensor]`): The edits of each table row, NCHW in [0, 1], on the CPU.
    """

    table: list
    grid: PIL.Image.Image
    images: list


def _values(value, name: str, check) -> tuple:
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"`{name}` must hold at least one value, got {value!r}.")
        return tuple(check(v, f"{name}[{i}]") for i, v in enumerate(value))
    return (check(value, name),)


@torch.no_grad()
def sweep(
    pipe, images, prompt_src: str, prompt_tar: str, edit_strengths=(0.25, 0.5, 1.0), t0s=(300, 400, 500),
    clip_losses: list[CLIPDirectionalLoss] | None = None, batch_size: int | None = None, **edit_kwargs,
) -> SweepOutput:  # fmt: skip
    r"""
    Edits the held-out ``images`` over the grid ``t0s`` x ``edit_strengths`` and scores every setting: how far an
    adapter's edit goes, and what it costs the image, as the inversion depth (``t0``: deeper edits more and keeps
    less) and the edit strength (``edit_strength`` r of `DiffusionCLIPPipeline.edit`: ``eps = r * eps_adapted + (1 -
    r) * eps_original`` at every step; 0 reconstructs, 1 is the adapter's edit, above 1 extrapolates) change.

    The images are inverted once per ``t0`` (the original model's DDIM inversion, or with ``encoding="noise"`` the
    encoding noise, drawn from ``generator`` reset to its state at the call for every ``t0``) and that ``x_t0`` is
    shared by the strengths, so at one ``t0`` the rows differ only in the strength; with ``eta=0`` (the default) each
    row is exactly ``pipe.edit(images, t0=t0, edit_strength=r, **edit_kwargs)`` (the generator at its state then).

    Args:
        pipe ([`DiffusionCLIPPipeline`]): The pipeline, with the adapter(s) to evaluate active.
        images: The held-out images (any form `DiffusionCLIPPipeline.invert` accepts).
        prompt_src / prompt_tar (`str`): The edit's prompts (for the scores).
        edit_strengths (`float` or `Sequence[float]`, *optional*, defaults to ``(0.25, 0.5, 1.0)``): The strengths
            (the effect is far from linear: most of the change happens below 0.5, docs/design.md; values above 1
            extrapolate, with a warning).
        t0s (`int` or `Sequence[int]`, *optional*, defaults to ``(300, 400, 500)``): The inversion depths, each in
            [1, T - 1].
        clip_losses (`list[CLIPDirectionalLoss]`, *optional*): What to score with; `scoring_losses(pipe)` if `None`.
        batch_size (`int`, *optional*): Images edited at once (all by default).
        **edit_kwargs: The other `DiffusionCLIPPipeline.edit` arguments (``num_inversion_steps``,
            ``num_inference_steps``, ``num_fixed_point_iterations``, ``encoding``, ``generator``, ...), the same for
            every setting.

    Returns:
        [`SweepOutput`]: the table (one dict per setting), the grid image and the edits.

    Examples:

    ```py
    >>> from diffusionclip_pipeline.evaluation import sweep

    >>> out = sweep(pipe, faces, "face", "smiling face", edit_strengths=(0.5, 1.0), t0s=(300, 500))
    >>> [(row["t0"], row["edit_strength"], round(row["s_dir"], 3)) for row in out.table]
    >>> out.grid.save("sweep.png")
    ```
    """
    # 1. Check inputs (every setting, before any work)
    check_prompt(prompt_src, "prompt_src")
    check_prompt(prompt_tar, "prompt_tar")
    strengths = _values(edit_strengths, "edit_strengths", check_number)
    t0s = _values(t0s, "t0s", lambda v, name: check_timestep(v, name, pipe.num_train_timesteps))
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")
    settings = _check_edit_kwargs(pipe, edit_kwargs, _OWN_KWARGS + _SWEPT_KWARGS)
    x0 = pipe.prepare_image(images, name="images")
    for t0 in t0s:
        _check_edit_settings(pipe, x0, settings, t0)
    clip_losses = scoring_losses(pipe) if clip_losses is None else clip_losses
    # the inversion's settings (`edit`'s defaults where not given: those of `invert`), checked above
    inversion = {k: settings[k] for k in (*_INVERSION_KWARGS, "generator")}
    generators = inversion.get("generator")
    generators = [] if generators is None else generators if isinstance(generators, list) else [generators]
    states = [g.get_state() for g in generators]
    # 2. Per depth: invert once (the generators as given: every depth gets the same encoding noise); per strength:
    #    regenerate from the shared x_t0 and score
    table, edits = [], []
    for t0 in t0s:
        for g, state in zip(generators, states):
            g.set_state(state)
        inverted = inverted_batches(pipe, x0, batch_size or x0.shape[0], t0, **inversion)
        x_t0 = torch.cat([x for _, x in inverted])
        for strength in strengths:
            out = evaluate_edit(
                pipe, PreparedImages(x0), prompt_src, prompt_tar, clip_losses, batch_size, latents=x_t0, t0=t0,
                edit_strength=strength, **edit_kwargs,
            )  # fmt: skip
            table.append({"t0": t0, "edit_strength": strength, **out.scores})
            edits.append(out.images)
    # 3. The grid: inputs, then one row per setting
    source = postprocess_image(x0)
    rows = [source] + [postprocess_image(e * 2 - 1) for e in edits]
    return SweepOutput(table=table, grid=image_grid(rows), images=edits)

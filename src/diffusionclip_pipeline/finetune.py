"""CLIP-directional LoRA fine-tuning of the UNet (DiffusionCLIP, Kim, Kwon, Ye, CVPR 2022, arXiv 2110.02711, Sec. 3.2).

Two schemes (paper Fig. 3 / supplementary B.1; `shared/reference/official.md` section 2):

- ``"efficient"`` (default, the paper's GPU-efficient fine-tuning): from each precomputed ``x_t0``, walk the
  ``num_train_steps`` DDIM generation steps; at every step predict eps with the LoRA UNet, form
  ``x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``, take the loss on ``x0_hat``, backpropagate and step the
  optimizer. The next ``x_t`` comes from the detached DDIM step, so memory is flat in ``num_train_steps``.
- ``"full_chain"`` (the paper's original fine-tuning): backpropagate through the whole generation chain, loss on the
  final image, one optimizer step per batch.

The parts, each changeable on its own: `build_losses` (the loss terms, `FinetuneLoss`), `training_images` and
`precompute_latents` (the data), `TrainStep` (optimizer, mixed precision, gradient accumulation, clipping, non-finite
checks), `SCHEMES` (one function per scheme), the checkpoints (`read_checkpoint`; written every ``checkpoint_every``
optimizer steps, resumed bit for bit) and `finetune`, which ties them together and undoes everything if a run
fails. Only this module creates optimizers. The test-bed measurements behind the defaults are in
`docs/testbed-experiments.md`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput
from safetensors.torch import load_file

from . import evaluation, lora
from ._version import __version__
from .checkpointing import (
    Checkpoint,
    _check_settings,
    _Checkpointer,
    _config_settings,
    _data_settings,
    _model_settings,
    read_checkpoint,
)
from .clip_loss import LOSS_TYPES, CLIPDirectionalLoss, unknown_words
from .families import autoencoders as autoencoder
from .image_io import image_grid
from .image_processing import postprocess_image
from .lora import (
    DEFAULT_TARGET_MODULES,
    LoraSettings,
    adapter_names,
    adapter_parameters,
    adapters_disabled,
    add_adapter,
    atomic_save_file,
    weights_fingerprint,
)
from .scheduling_ddim_grid import GridDDIMScheduler, ddim_timesteps
from .utils.checks import (
    check_adapter_name,
    check_bool,
    check_callable,
    check_choice,
    check_int,
    check_non_negative_int,
    check_number,
    check_positive_int,
    check_prompt,
    check_prompt_or_empty,
    check_timestep,
    short_repr,
)

MIXED_PRECISION = ("no", "fp16", "bf16")
ENCODINGS = ("ddim", "noise")
L1_SPACES = ("pixel", "latent")
LOSS_WEIGHTS = (
    "clip_loss_weight", "global_clip_loss_weight", "l1_loss_weight", "sparse_loss_weight", "identity_loss_weight",
)  # fmt: skip
# `keep_best` criteria: the validation scores (`evaluation.score_edits`); larger is better except for `mae`
KEEP_BEST = ("s_dir", "s_dir_2", "clip_score", "mae", "ssim")
# accelerate's trackers (`report_to`) and the packages they need (any one of them)
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "comet_ml": ("comet_ml",)}
TRACKER_PROJECT = "diffusionclip-finetune"


@dataclass
class FinetuneConfig:
    """Settings for CLIP-directional LoRA fine-tuning (DiffusionCLIP, arXiv 2110.02711, Sec. 3.2).

    Defaults follow the official code where it applies to LoRA (``t0=500``, 40 inversion steps, 6 generation steps,
    the directional loss); the learning rate is LoRA's (a low-rank update needs a far larger rate than the official
    full-weight 8e-6), and the CLIP loss averages 4 random views (off in the official code). For 256 px models (e.g.
    `google/ddpm-celebahq-256`) we recommend ``learning_rate=1e-4``, ``num_epochs=5``, ``l1_loss_weight=0.1..1.0``,
    30+ images and ``lora_rank=4``; see `docs/testbed-experiments.md` for the measurements behind these.

    A value of the wrong type raises `TypeError`, a value out of range `ValueError`, each naming the field.
    """

    t0: int = field(default=500, metadata={"help": "Inversion depth (timestep of the latents), in [1, T-1]."})
    num_inversion_steps: int = field(default=40, metadata={"help": "DDIM steps to precompute x_t0."})
    num_fixed_point_iterations: int = field(
        default=0, metadata={"help": "Fixed-point refinements per inversion step of x_t0 (see `pipe.invert`)."}
    )
    num_train_steps: int = field(default=6, metadata={"help": "DDIM generation steps per image during training."})
    num_epochs: int = field(default=10, metadata={"help": "Passes over the training images."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Adam learning rate of the LoRA weights."})
    batch_size: int = field(default=4, metadata={"help": "Images per optimizer batch (per process)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches accumulated per update."})
    clip_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the directional CLIP loss."})
    clip_loss_type: str = field(default="cosine", metadata={"help": "'cosine' (1 - cos) or 'neg_log'."})
    global_clip_loss_weight: float = field(default=0.0, metadata={"help": "Weight of 1 - cos(E_I(x0_hat), E_T(tar))."})
    clip_num_augmentations: int = field(
        default=4, metadata={"help": "Random views (shift + flip) averaged in the CLIP loss; 0: none (official)."}
    )
    clip_augmentation_noise: float = field(
        default=0.0, metadata={"help": "Std of the Gaussian pixel noise added to each CLIP view ([-1, 1] scale)."}
    )
    l1_loss_weight: float = field(default=0.6, metadata={"help": "Weight of |x0 - x0_hat| (identity keeping)."})
    sparse_loss_weight: float = field(
        default=0.0, metadata={"help": "Weight of mean(sqrt(|x0 - x0_hat| + eps) - sqrt(eps)): change few pixels."}
    )
    identity_loss_weight: float = field(default=0.0, metadata={"help": "Weight of the user's `identity_loss`."})
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=4.0, metadata={"help": "LoRA alpha (scale alpha / r)."})
    lora_target_modules: tuple[str, ...] = field(default=DEFAULT_TARGET_MODULES, metadata={"help": "Module names."})
    scheme: str = field(
        default="efficient", metadata={"help": "'efficient' (step-wise), 'full_chain' or 'one_step' (EffDiff)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of LoRA init, shuffling and sampled images."})
    mixed_precision: str = field(default="no", metadata={"help": "'no', 'fp16' or 'bf16' (autocast)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute UNet activations in backward."})
    max_grad_norm: float | None = field(default=None, metadata={"help": "Clip the LoRA gradient norm (None: off)."})
    num_sampled_images: int = field(default=8, metadata={"help": "Images sampled from the model if none given."})
    num_sampling_steps: int = field(default=50, metadata={"help": "DDIM steps to sample those images."})
    encoding: str = field(
        default="ddim",
        metadata={"help": "x_t0 of the training images: 'ddim' (inversion) or 'noise' (EffDiff: forward noise)."},
    )
    conditioning_prompt: str = field(
        default="", metadata={"help": "Text-conditioned UNets (Stable Diffusion): the prompt it is conditioned on."}
    )
    l1_space: str = field(
        default="pixel", metadata={"help": "Latent models: L1 on the decoded images ('pixel') or on the latents."}
    )
    decoder_gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Latent models: recompute the decoder's activations in backward."}
    )

    def __post_init__(self):
        # t0's upper bound, T - 1, is the model's: checked by `finetune`
        for name in (
            "t0", "num_inversion_steps", "num_train_steps", "num_epochs", "batch_size",
            "gradient_accumulation_steps", "num_sampled_images", "num_sampling_steps",
        ):  # fmt: skip
            setattr(self, name, check_positive_int(getattr(self, name), name))
        self.num_fixed_point_iterations = check_non_negative_int(
            self.num_fixed_point_iterations, "num_fixed_point_iterations"
        )
        for name in LOSS_WEIGHTS:
            setattr(self, name, check_number(getattr(self, name), name, minimum=0))
        if not any(getattr(self, name) > 0 for name in LOSS_WEIGHTS):
            raise ValueError(f"Nothing to train: every loss weight is 0 ({', '.join(LOSS_WEIGHTS)}).")
        self.clip_augmentation_noise = check_number(
            self.clip_augmentation_noise, "clip_augmentation_noise", minimum=0, maximum=2, max_inclusive=False
        )
        self.clip_num_augmentations = check_non_negative_int(self.clip_num_augmentations, "clip_num_augmentations")
        self.learning_rate = check_number(self.learning_rate, "learning_rate", minimum=0, min_inclusive=False)
        check_choice(self.scheme, "scheme", SCHEMES)
        check_choice(self.mixed_precision, "mixed_precision", MIXED_PRECISION)
        check_choice(self.clip_loss_type, "clip_loss_type", LOSS_TYPES)
        if self.max_grad_norm is not None:
            self.max_grad_norm = check_number(self.max_grad_norm, "max_grad_norm", minimum=0, min_inclusive=False)
        self.seed = check_int(self.seed, "seed")
        self.gradient_checkpointing = check_bool(self.gradient_checkpointing, "gradient_checkpointing")
        check_choice(self.encoding, "encoding", ENCODINGS)
        check_choice(self.l1_space, "l1_space", L1_SPACES)
        self.conditioning_prompt = check_prompt_or_empty(self.conditioning_prompt, "conditioning_prompt")
        self.decoder_gradient_checkpointing = check_bool(
            self.decoder_gradient_checkpointing, "decoder_gradient_checkpointing"
        )
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = (self.lora_target_modules,)
        self.lora_target_modules = self.lora.target_modules  # validates rank, alpha and targets

    @property
    def lora(self) -> LoraSettings:
        return LoraSettings(rank=self.lora_rank, alpha=self.lora_alpha, target_modules=self.lora_target_modules)

    @classmethod
    def from_kwargs(cls, config: FinetuneConfig | None = None, **kwargs) -> FinetuneConfig:
        """``config`` (or the defaults) with ``kwargs`` overriding single fields; unknown names are a `TypeError`."""
        if config is not None and not isinstance(config, FinetuneConfig):
            raise TypeError(f"`config` must be a FinetuneConfig or None, got {type(config).__name__}.")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"Unknown fine-tuning setting(s) {unknown}; valid names: {sorted(names)}.")
        base = asdict(config) if config is not None else {}
        return cls(**{**base, **kwargs})


@dataclass
class FinetuneOutput(BaseOutput):
    """Output of `finetune` / `DiffusionCLIPPipeline.finetune`.

    Args:
        adapter_name (`str`): The name of the trained adapter in the UNet.
        loss_history (`list[float]`): The loss of every training step, in order (local to this process): one per
            generation step with ``scheme="efficient"``, one per batch with ``"full_chain"``.
        config (`FinetuneConfig`): The settings used.
        num_cached_latents (`int`): How many training latents came from the on-disk cache.
        num_clip_models (`int`): Over how many CLIP models the CLIP loss was averaged (2 with `clip_model_2`).
        validation (`list[dict]`): With ``validation_images``: one dict per validated epoch, in order, with
            ``"epoch"`` (1-based) and the scores of `evaluation.score_edits` (``"s_dir"``, ``"s_dir_2"`` with a second
            CLIP, ``"mae"``, ``"ssim"``, ``"clip_score"``); empty without.
        best_epoch (`int`, *optional*): With ``keep_best``: the (1-based) epoch whose adapter weights were kept.
        validation_grid (`PIL.Image.Image`, *optional*): With ``validation_images``: the held-out images as the
            model sees them (first row), then their edit at each validated epoch (one row each, in order).
    """

    adapter_name: str
    loss_history: list[float]
    config: FinetuneConfig
    num_cached_latents: int = 0
    num_clip_models: int = 1
    validation: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    validation_grid: PIL.Image.Image | None = None


class NonFiniteLossError(FloatingPointError):
    """The loss, a gradient, the adapter's weights or the adapted UNet's prediction became NaN/inf. `finetune` then
    discards the new adapter and restores the adapters the UNet had before the call."""


# ---- the loss ------------------------------------------------------------------------------------------------


SPARSE_EPS = 0.01


def sparse_change(x0_src: torch.Tensor, x0_pred: torch.Tensor, eps: float = SPARSE_EPS) -> torch.Tensor:
    """Per-pixel ``sqrt(|x0_src - x0_pred| + eps) - sqrt(eps)`` (images in [-1, 1]); 0 where nothing changed.

    A concave penalty: the same total change costs more spread thinly over many pixels (a tint) than concentrated
    on a few (the edited object). A change of 0.06 everywhere costs 0.165 per pixel, a full 1.4 change 1.08: a
    ratio of 6.5, where L1 has 23.
    """
    return torch.sqrt((x0_src - x0_pred).abs() + eps) - eps**0.5


@dataclass
class SourceBatch:
    """A batch's source images in pixels, their CLIP embeddings (or ``None`` each) and latents (or ``None``)."""

    images: torch.Tensor
    embeds: list
    latents: torch.Tensor | None = None


@dataclass
class FinetuneLoss:
    r"""The fine-tuning objective on one predicted image (DiffusionCLIP, arXiv 2110.02711, Sec. 3.2, plus extra terms):

    ``mean_k L_clip_k(x0_src, x0_pred) + l1 |x0_src - x0_pred| + sparse * sparse_change + identity * identity_loss``

    with one directional CLIP loss per CLIP model (`CLIPDirectionalLoss`, averaged) and each term only when its
    weight is > 0. Adding a loss term means changing only this class and `build_losses`.

    Args:
        clip_losses (`list[CLIPDirectionalLoss]`): One per CLIP model.
        directions (`list[torch.Tensor]`): The target direction in each CLIP's embedding space (text or images).
        prompt_src (`str`) / prompt_tar (`str`): The prompts (the global CLIP term needs ``prompt_tar``).
        config (`FinetuneConfig`): The loss weights.
        identity_loss (`Callable`, *optional*): ``fn(x0_src, x0_pred) -> per-sample loss``.
    """

    clip_losses: list[CLIPDirectionalLoss]
    directions: list[torch.Tensor]
    prompt_src: str
    prompt_tar: str
    config: FinetuneConfig
    identity_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None
    decoder: torch.nn.Module | None = None  # the autoencoder `decode` runs (kept frozen during training)

    @property
    def use_clip(self) -> bool:
        return self.config.clip_loss_weight > 0 or self.config.global_clip_loss_weight > 0

    def source_batch(self, x0_src: torch.Tensor) -> SourceBatch:
        """What the loss needs of a batch's source images, once per batch and reused by every generation step (the
        official code re-encodes the source each step): the CLIP embeddings (``None`` each when the CLIP loss is off
        or draws new random views at every call) and, for an L1 in latent space, the source latents."""
        embeds = [None] * len(self.clip_losses)
        latents = None
        with torch.no_grad():
            if self.use_clip and self.config.clip_num_augmentations == 0:
                embeds = [fn.encode_images(x0_src) for fn in self.clip_losses]
            if self.encode is not None and self.config.l1_space == "latent":
                latents = self.encode(x0_src)
        return SourceBatch(x0_src, embeds, latents)

    def __call__(self, source: SourceBatch, x0_pred: torch.Tensor) -> torch.Tensor:
        """The loss of ``x0_pred`` (the UNet's space: decoded to pixels first for a latent model)."""
        config = self.config
        latents_pred = x0_pred
        if self.decode is not None:  # latent model: CLIP (and the pixel L1) see the decoded image, with gradients
            x0_pred = self.decode(x0_pred).to(source.images.dtype)
        x0_src = source.images
        loss = x0_pred.new_zeros(())
        if self.use_clip:
            clip_losses = [
                fn(x0_src, x0_pred, self.prompt_src, self.prompt_tar, text_direction=direction, source_embeds=embeds)
                for fn, direction, embeds in zip(self.clip_losses, self.directions, source.embeds)
            ]
            loss = loss + sum(clip_losses) / len(clip_losses)
        if config.l1_loss_weight > 0 and source.latents is not None:
            loss = loss + config.l1_loss_weight * (source.latents - latents_pred).abs().mean()
        elif config.l1_loss_weight > 0:
            loss = loss + config.l1_loss_weight * (x0_src - x0_pred).abs().mean()
        if config.sparse_loss_weight > 0:
            loss = loss + config.sparse_loss_weight * sparse_change(x0_src, x0_pred).mean()
        if self.identity_loss is not None and config.identity_loss_weight > 0:
            loss = loss + config.identity_loss_weight * self.identity_loss(x0_src, x0_pred).mean()
        return loss


def build_losses(
    pipe, config: FinetuneConfig, prompt_src: str, prompt_tar: str, direction_images=None, identity_loss=None,
    device: torch.device | None = None, loss_vae=None,
) -> FinetuneLoss:  # fmt: skip
    """The `FinetuneLoss` of a run: one `CLIPDirectionalLoss` per CLIP of ``pipe.clip_models`` (the default CLIP is
    loaded if the pipeline has none), with the text direction of the prompts or, given ``direction_images = (source,
    target)`` (prepared tensors), the image-set direction in each CLIP's own embedding space. For a latent model the
    predicted ``x0`` is decoded to pixels for the loss, by the pipeline's autoencoder or by ``loss_vae`` (e.g. TAESD,
    an `AutoencoderTiny` sharing the latent space)."""
    pipe.require_clip()
    clip_losses = [
        CLIPDirectionalLoss(
            clip_model, clip_tokenizer, loss_type=config.clip_loss_type,
            direction_weight=config.clip_loss_weight, global_weight=config.global_clip_loss_weight,
            num_augmentations=config.clip_num_augmentations, augmentation_noise=config.clip_augmentation_noise,
            seed=config.seed,
        ).to(device)
        for clip_model, clip_tokenizer in pipe.clip_models
    ]  # fmt: skip
    if direction_images is None:
        directions = [fn.text_direction(prompt_src, prompt_tar) for fn in clip_losses]
    else:  # image-guided: the mean embedding change between the two image sets
        source_set, target_set = (x.to(device) for x in direction_images)
        directions = [fn.image_set_direction(source_set, target_set) for fn in clip_losses]
    decode = encode = None
    if pipe.autoencoder is not None:
        if loss_vae is None:
            decode = pipe.decode_latents
        else:
            decode = lambda z: autoencoder.decode(loss_vae, z.to(loss_vae.dtype))  # noqa: E731
        encode = pipe.encode_image
    decoder = loss_vae if loss_vae is not None else pipe.autoencoder
    return FinetuneLoss(
        clip_losses, directions, prompt_src, prompt_tar, config, identity_loss, decode, encode, decoder
    )


# ---- the data ------------------------------------------------------------------------------------------------


def training_images(
    pipe, images: torch.Tensor | None, config: FinetuneConfig, device: torch.device, generator: torch.Generator
) -> torch.Tensor:
    """The training images ``x0`` in [-1, 1], on ``device`` in the UNet's dtype: ``images`` (as `pipe.prepare_image`
    returns them), or, if `None`, ``config.num_sampled_images`` images sampled from the original model (every
    adapter bypassed) by DDIM from pure noise drawn from ``generator``."""
    if images is None:
        unet = pipe.unet
        shape = (config.num_sampled_images, unet.config.in_channels) + (unet.config.sample_size,) * 2
        noise = torch.randn(shape, generator=generator).to(device, unet.dtype)
        with adapters_disabled(unet), warnings.catch_warnings():
            # the original model on purpose: `edit`'s NoAdapterWarning (only a reconstruction) is expected here
            warnings.filterwarnings("ignore", message="No adapter is active")
            images = pipe.edit(
                latents=noise, t0=pipe.num_train_timesteps - 1, num_inference_steps=config.num_sampling_steps,
                output_type="pt",
            ).images * 2 - 1  # fmt: skip
    return images.to(device=device, dtype=pipe.unet.dtype)


def _latent_cache_key(x0: torch.Tensor, t0: int, steps: int, unet_fingerprint: str, fixed_point: int = 0) -> str:
    digest = hashlib.sha256()
    digest.update(x0.detach().float().cpu().contiguous().numpy().tobytes())
    digest.update(f"|{tuple(x0.shape)}|t0={t0}|steps={steps}|unet={unet_fingerprint}".encode())
    if fixed_point:  # keys of plain inversion stay as they were
        digest.update(f"|fixed_point={fixed_point}".encode())
    return digest.hexdigest()


def precompute_latents(
    pipe, x0: torch.Tensor, t0: int, num_inversion_steps: int, batch_size: int, cache_dir=None,
    num_fixed_point_iterations: int = 0, prompt: str | None = None, encoding: str = "ddim", generator=None,
):  # fmt: skip
    """``x_t0`` of every image by deterministic inversion with the original UNet (no grad), optionally cached;
    with ``encoding="noise"`` by EffDiff's closed-form forward noise from ``generator`` instead (never cached).

    The cache holds one safetensors file per image, keyed by the image's content, ``t0``, the step count, the
    fixed-point iterations and the base UNet's config and weights, so a cache entry can never be used for other
    inputs, settings or another model.

    Returns:
        `tuple[torch.Tensor, int]`: the latents and how many came from the cache.
    """
    if encoding == "noise":
        with torch.no_grad():
            return pipe.noise_to(pipe.encode_image(x0), t0, generator), 0
    latents = [None] * x0.shape[0]
    keys = [None] * x0.shape[0]
    hits = 0
    if cache_dir is not None:
        fingerprint = weights_fingerprint(pipe.unet)
        if prompt:  # a conditional UNet's inversion depends on its prompt (keys of the empty prompt stay as they were)
            fingerprint += f"|prompt={prompt}"
        for i in range(x0.shape[0]):
            keys[i] = _latent_cache_key(x0[i], t0, num_inversion_steps, fingerprint, num_fixed_point_iterations)
            path = os.path.join(cache_dir, f"latent-{keys[i]}.safetensors")
            if os.path.isfile(path):
                latents[i] = load_file(path)["latents"].to(x0)
                hits += 1
    todo = [i for i in range(x0.shape[0]) if latents[i] is None]
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        out = pipe.invert(
            x0[idx], t0=t0, num_inversion_steps=num_inversion_steps,
            num_fixed_point_iterations=num_fixed_point_iterations, return_dict=False, prompt=prompt,
        )[0]  # fmt: skip
        for j, i in enumerate(idx):
            latents[i] = out[j : j + 1]
            if cache_dir is not None:
                path = os.path.join(cache_dir, f"latent-{keys[i]}.safetensors")
                atomic_save_file({"latents": out[j : j + 1]}, path, metadata={"t0": str(t0)})
    return torch.cat(latents), hits


# ---- the optimizer step --------------------------------------------------------------------------------------


MIN_LOSS_SCALE = 1.0  # fp16: a run whose gradients overflow even below this loss scale has diverged
_DISCARDED = "the new adapter is discarded and the previous adapters restored"
_HINT = "a lower `learning_rate`, a `max_grad_norm` or `mixed_precision='no'` may help"


def _check_finite(loss: torch.Tensor, params, where: str) -> None:
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(f"Non-finite loss ({loss.item()}) at {where}; {_DISCARDED} ({_HINT}).")
    for p in params:
        if p.grad is not None and not torch.isfinite(p.grad).all():
            raise NonFiniteLossError(f"Non-finite gradient at {where}; {_DISCARDED} ({_HINT}).")


class TrainStep:
    """The optimizer side of a run: Adam on the adapter's parameters, the mixed-precision forward (autocast, with a
    `GradScaler` for fp16), gradient accumulation and data parallelism through accelerate, gradient-norm clipping and
    the non-finite checks. Nothing is applied to the weights at a step whose loss or gradients are NaN/inf: a
    non-finite loss stops the run; so do non-finite gradients, except with fp16 loss scaling, where the scaler skips
    such steps and lowers the scale (the run stops once the scale falls below `MIN_LOSS_SCALE`).

    Args:
        unet (`UNet2DModel`): The UNet holding the new adapter.
        params (`list[torch.nn.Parameter]`): The adapter's parameters (the only ones optimized).
        config (`FinetuneConfig`): ``learning_rate``, ``mixed_precision`` and ``max_grad_norm``.
        accelerator (`accelerate.Accelerator`): Wraps the UNet (DDP over processes) until `close`.
    """

    def __init__(self, unet, params: list[torch.nn.Parameter], config: FinetuneConfig, accelerator):
        self.params, self.accelerator, self.device = params, accelerator, accelerator.device
        self.max_grad_norm = config.max_grad_norm
        optimizer = torch.optim.Adam(params, lr=config.learning_rate)
        # DDP over processes; undone by `close`
        self.model, self.optimizer = accelerator.prepare(unet, optimizer)
        # Mixed precision is applied here rather than by `Accelerator(mixed_precision=...)`: accelerate's state is a
        # process-wide singleton that refuses a second, different precision within one process.
        self.amp_dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
        fp16 = self.amp_dtype is torch.float16
        self.grad_scaler = torch.amp.GradScaler(self.device.type) if fp16 else None
        self.num_updates = 0  # accumulation boundaries passed (optimizer steps, including any the scaler skipped)
        self.condition = None  # a text-conditioned UNet's encoder hidden states (batch-first), set by the run

    def predict(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """The adapted UNet's noise prediction at integer timestep ``t``, in ``x``'s dtype."""
        kwargs = {} if self.condition is None else {"encoder_hidden_states": self.condition[: x.shape[0]]}
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return self.model(x, torch.tensor(t, device=self.device), **kwargs).sample.to(x.dtype)

    def accumulate(self):
        """Context of one micro-batch (accelerate syncs gradients only at accumulation boundaries)."""
        return self.accelerator.accumulate(self.model)

    def __call__(self, loss: torch.Tensor, where: str) -> None:
        """Backward and, at accumulation boundaries, one optimizer step; ``where`` names the step in errors."""
        _check_finite(loss, [], where)
        scaler = self.grad_scaler
        self.accelerator.backward(scaler.scale(loss) if scaler else loss)
        if not self.accelerator.sync_gradients:
            return
        if scaler:
            scaler.unscale_(self.optimizer)
        else:  # with fp16 loss scaling, inf gradients are expected now and then: the scaler skips those steps
            _check_finite(loss, self.params, where)
        if self.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
        if scaler:
            scaler.step(self.optimizer)
            scaler.update()
            if scaler.get_scale() < MIN_LOSS_SCALE:
                raise NonFiniteLossError(
                    f"Non-finite gradients at {where} even at fp16 loss scale {scaler.get_scale():g}; {_DISCARDED} "
                    f"({_HINT})."
                )
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_updates += 1

    @property
    def pending_gradients(self) -> bool:
        """True while gradients are accumulated but not yet applied (between accumulation boundaries)."""
        return any(p.grad is not None for p in self.params)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """What a checkpoint needs to continue bit for bit, at an optimizer-step boundary: the optimizer's tensors
        (``"state.<param index>.<key>"``) and everything else as JSON (param groups, the `GradScaler`'s state, the
        update counter and accelerate's micro-step counter, which decides the accumulation boundaries)."""
        optimizer = self.optimizer.state_dict()
        tensors, rest = {}, {}
        for index, entry in optimizer["state"].items():
            for key, value in entry.items():
                if torch.is_tensor(value):
                    tensors[f"state.{index}.{key}"] = value
                else:
                    rest.setdefault(str(index), {})[key] = value
        return tensors, {
            "optimizer": {"param_groups": optimizer["param_groups"], "state": rest},
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "num_updates": self.num_updates,
            "accelerator_step": int(self.accelerator.step),
        }

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Restores what `state` returned (the tensors are copied into fresh memory: views into a file's buffer
        can be unaligned, and CPU kernels round differently on unaligned memory)."""
        entries: dict[int, dict] = {int(i): dict(entry) for i, entry in state["optimizer"]["state"].items()}
        for key, value in tensors.items():
            _, index, name = key.split(".", 2)
            entries.setdefault(int(index), {})[name] = value.clone()
        current = self.optimizer.state_dict()["param_groups"]
        groups = [
            {k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in group.items()}  # JSON made tuples lists
            for group, now in zip(state["optimizer"]["param_groups"], current)
        ]
        self.optimizer.load_state_dict({"state": entries, "param_groups": groups})
        if self.grad_scaler is not None:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.num_updates = int(state["num_updates"])
        self.accelerator.step = int(state["accelerator_step"])

    def check_result(self, x: torch.Tensor, t: int) -> None:
        """After the last optimizer step: raises `NonFiniteLossError` if an adapter weight is NaN/inf, or if the
        adapted UNet's noise prediction on ``x`` at ``t`` is (finite but huge weights, e.g. from a far too large
        learning rate, are caught by the latter)."""
        bad = sum(int((~torch.isfinite(p)).sum()) for p in self.params)
        if bad:
            raise NonFiniteLossError(
                f"{bad} adapter weight(s) are not finite after the last optimizer step; {_DISCARDED} ({_HINT})."
            )
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                eps = self.predict(x, t)
        finally:
            self.model.train(training)
        if not torch.isfinite(eps).all():
            raise NonFiniteLossError(
                f"The adapted UNet predicts non-finite noise after the last optimizer step (its weights reach "
                f"{max(float(p.detach().abs().max()) for p in self.params):.3g}); {_DISCARDED} ({_HINT})."
            )

    def close(self) -> None:
        """Drops the gradients and unwraps the UNet again (no DDP or autocast wrapper left on it)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)


# ---- the schemes: one function per batch, one shared signature ------------------------------------------------


def _train_batch_efficient(step: TrainStep, loss_fn: FinetuneLoss, scheduler, x, source: SourceBatch, where):
    """The paper's GPU-efficient fine-tuning: one update per generation step, loss on that step's ``x0_hat``; the
    chain itself is detached. Returns the loss of every step."""
    losses = []
    for t in [int(t) for t in scheduler.timesteps]:
        with step.accumulate():
            out = scheduler.step(step.predict(x, t), t, x)
            loss = loss_fn(source, out.pred_original_sample)
            step(loss, f"{where}, timestep {t}")
        x = out.prev_sample.detach()  # from the pre-update weights, as the official code
        losses.append(loss.item())
    return losses


def _train_batch_full_chain(step: TrainStep, loss_fn: FinetuneLoss, scheduler, x, source: SourceBatch, where):
    """The paper's original fine-tuning: backpropagate through the whole generation chain, loss on the final image.
    Returns the batch's one loss."""
    with step.accumulate():
        for t in [int(t) for t in scheduler.timesteps]:
            x = scheduler.step(step.predict(x, t), t, x).prev_sample
        loss = loss_fn(source, x)
        step(loss, where)
    return [loss.item()]


def _train_batch_one_step(step: TrainStep, loss_fn: FinetuneLoss, scheduler, x, source: SourceBatch, where):
    """EffDiff's fine-tuning (Starodubcev et al., arXiv 2304.04344): the loss on the ``x0_hat`` of one UNet call at
    ``t0`` from ``x_t0``: one forward and backward per image. Returns the batch's one loss."""
    t = int(scheduler.timesteps[0])  # the grid's top: t0
    with step.accumulate():
        loss = loss_fn(source, scheduler.step(step.predict(x, t), t, x).pred_original_sample)
        step(loss, f"{where}, timestep {t}")
    return [loss.item()]


SCHEMES: dict[str, Callable[..., list[float]]] = {
    "efficient": _train_batch_efficient,
    "full_chain": _train_batch_full_chain,
    "one_step": _train_batch_one_step,
}


def _train(
    pipe, step: TrainStep, loss_fn: FinetuneLoss, x0, x_t0, config: FinetuneConfig, generator,
    checkpoints: _Checkpointer | None = None, resume: Checkpoint | None = None, validation: _Validation | None = None,
) -> list[float]:  # fmt: skip
    """``config.num_epochs`` passes over the images, shuffled by ``generator``; returns the loss history. With
    ``checkpoints``, writes one whenever due (at batch ends); with ``resume``, continues where that checkpoint was;
    with ``validation``, validates at the end of the epochs it is due and finally keeps the best epoch's weights (if
    asked). The loss goes to the accelerator's trackers, if it has any."""
    scheduler = GridDDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(timesteps=ddim_timesteps(config.t0, config.num_train_steps, pipe.num_train_timesteps))
    train_batch = SCHEMES[config.scheme]
    # data-parallel shards: every process gets the same number of batches (indices wrap around)
    n, world, rank = x0.shape[0], step.accelerator.num_processes, step.accelerator.process_index
    per_process = math.ceil(n / world)
    num_batches = math.ceil(per_process / config.batch_size)
    loss_history: list[float] = []
    first_epoch, first_batch = 0, 0
    if resume is not None:
        loss_history, first_epoch, first_batch = list(resume.loss_history), resume.epoch, resume.batch
        resume.restore(step, generator, loss_fn.clip_losses)
    progress = pipe.progress_bar(total=config.num_epochs * num_batches)
    if first_epoch or first_batch:  # a resumed run: rate and time left from this run's batches only
        progress.n = progress.last_print_n = progress.initial = first_epoch * num_batches + first_batch
    tracking = bool(step.accelerator.trackers)
    scores: dict[str, str] = {}  # the last validation's, shown in the progress bar from then on
    try:
        for epoch in range(first_epoch, config.num_epochs):
            epoch_start = generator.get_state()  # what a checkpoint within this epoch stores to redraw its order
            order = torch.randperm(n, generator=generator).tolist()
            order = (order * world)[: per_process * world][rank::world]
            for b in range(first_batch if epoch == first_epoch else 0, num_batches):
                idx = order[b * config.batch_size : (b + 1) * config.batch_size]
                source = loss_fn.source_batch(x0[idx])
                losses = train_batch(step, loss_fn, scheduler, x_t0[idx], source, f"epoch {epoch}, batch {b}")
                loss_history.extend(losses)
                # a dict keeps this order (keyword arguments would be sorted): epoch, optimizer steps, last loss
                postfix = {"epoch": epoch, "step": step.num_updates, "loss": f"{loss_history[-1]:.4f}"}
                progress.set_postfix({**postfix, **scores})
                progress.update(1)
                if tracking:
                    step.accelerator.log(
                        {"train/loss": sum(losses) / len(losses), "epoch": epoch + 1}, step.num_updates
                    )
                if checkpoints is not None and checkpoints.due(step):
                    if b + 1 < num_batches:  # next: batch b + 1 of this epoch, in this epoch's order
                        checkpoints.write(step, loss_fn, epoch, b + 1, epoch_start, loss_history)
                    else:
                        checkpoints.write(step, loss_fn, epoch + 1, 0, generator.get_state(), loss_history)
            if validation is not None and validation.due(epoch + 1, config.num_epochs):
                entry = validation(epoch + 1, step)
                scores = {k: f"{v:.3f}" for k, v in entry.items() if k != "epoch"}
                progress.set_postfix({**postfix, **scores})
    finally:
        progress.close()
    step.check_result(x_t0[:1], int(scheduler.timesteps[0]))
    if validation is not None:
        validation.keep_best_weights(step.params)
    return loss_history


# ---- validation during the run -------------------------------------------------------------------------------


@contextlib.contextmanager
def _progress_bars_off(pipe):
    """No progress bars from the pipeline's own calls inside the block (the run's bar is open); its settings after
    the block as they were."""
    had = hasattr(pipe, "_progress_bar_config")
    previous = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**previous, "disable": True})
    try:
        yield
    finally:
        if had:
            pipe.set_progress_bar_config(**previous)
        else:
            del pipe._progress_bar_config


@dataclass
class _Kept:
    """An epoch's score and a copy of the adapter's weights then."""

    value: float
    epoch: int
    weights: list[torch.Tensor]


@dataclass
class _Validation:
    """Validation during a run (as diffusers' training scripts validate): at the end of every ``every``-th epoch and
    after the last, the held-out images are edited with the current adapter (`evaluation.evaluate_edit` from their
    latents ``x_t0``, computed once with the original model), scored, logged to the accelerator's trackers, and, with
    ``keep_best``, the adapter's weights of the best epoch so far are copied.

    It never changes training: no gradients, the UNet in eval mode for the edit (its mode restored), torch's random
    state forked (the shuffling and CLIP-view generators are never touched), progress bars off.
    """

    pipe: object
    x0: torch.Tensor  # the held-out images as prepared (model input, [-1, 1])
    x_t0: torch.Tensor  # their latents at t0, by the original model
    prompt_src: str
    prompt_tar: str
    clip_losses: list[CLIPDirectionalLoss]
    edit_kwargs: dict
    batch_size: int
    every: int = 1
    keep_best: str | None = None
    min_ssim: float | None = None
    history: list[dict] = field(default_factory=list)
    rows: list[list] = field(default_factory=list)  # the grid: the inputs, then the edits of each validated epoch
    best: _Kept | None = None  # the best eligible epoch so far (by `keep_best`)
    fallback: _Kept | None = None  # while none is eligible: the epoch with the highest ssim
    best_epoch: int | None = None

    def due(self, epoch: int, num_epochs: int) -> bool:
        """Whether to validate after (1-based) ``epoch``: every ``every``-th one, and the last."""
        return epoch % self.every == 0 or epoch == num_epochs

    def __call__(self, epoch: int, step: TrainStep) -> dict:
        """Validates the adapter as it is after (1-based) ``epoch``; returns the entry added to `history`."""
        pipe, unet = self.pipe, self.pipe.unet
        training = unet.training
        devices = [step.device] if step.device.type == "cuda" else []
        unet.eval()
        # the adapter frozen, as it is used after the run: CPU kernels can round differently on weights that
        # require grad, even without autograd, so the scores are exactly those of the adapter as it is then
        flags = [(p, p.requires_grad) for p in step.params]
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            with torch.random.fork_rng(devices=devices), _progress_bars_off(pipe):
                out = evaluation.evaluate_edit(
                    pipe, self.x0, self.prompt_src, self.prompt_tar, self.clip_losses, self.batch_size,
                    latents=self.x_t0, **self.edit_kwargs,
                )  # fmt: skip
        except FloatingPointError as error:
            raise NonFiniteLossError(f"Validation after epoch {epoch}: {error}; {_DISCARDED} ({_HINT}).") from error
        finally:
            unet.train(training)
            for p, flag in flags:
                p.requires_grad_(flag)
        entry = {"epoch": epoch, **out.scores}
        self.history.append(entry)
        if not self.rows:
            self.rows.append(postprocess_image(out.source * 2 - 1))
        edited = postprocess_image(out.images * 2 - 1)
        self.rows.append(edited)
        if self.keep_best is not None:
            self._consider(entry, step.params)
        _log_validation(step.accelerator, entry, image_grid([self.rows[0], edited]), step.num_updates)
        return entry

    def _consider(self, entry: dict, params: list[torch.nn.Parameter]) -> None:
        value, ssim = entry[self.keep_best], entry["ssim"]
        eligible = math.isfinite(value) and (self.min_ssim is None or ssim >= self.min_ssim)
        if eligible:
            better = evaluation.HIGHER_IS_BETTER[self.keep_best]
            if self.best is None or (value > self.best.value if better else value < self.best.value):
                self.best = _Kept(value, entry["epoch"], [p.detach().clone() for p in params])
                self.fallback = None  # only needed while no epoch is eligible
        elif self.best is None and (self.fallback is None or ssim > self.fallback.value):
            self.fallback = _Kept(ssim, entry["epoch"], [p.detach().clone() for p in params])

    def keep_best_weights(self, params: list[torch.nn.Parameter]) -> None:
        """With ``keep_best``: sets the adapter's weights to the best epoch's, exactly (see `finetune`)."""
        if self.keep_best is None:
            return
        kept = self.best
        if kept is None:
            kept = self.fallback
            floor = f" reached `keep_best_min_ssim`={self.min_ssim}" if self.min_ssim is not None else " was eligible"
            warnings.warn(
                f"No validated epoch{floor} (with a finite `{self.keep_best}`): keeping epoch {kept.epoch}, the one "
                f"with the highest ssim ({kept.value:.4f}).",
                UserWarning,
                stacklevel=2,
            )
        with torch.no_grad():
            for p, weights in zip(params, kept.weights):
                p.copy_(weights)
        self.best_epoch = kept.epoch

    @property
    def grid(self) -> PIL.Image.Image | None:
        return image_grid(self.rows) if self.rows else None

    @property
    def kept_scores(self) -> dict | None:
        """The entry of the epoch whose weights the adapter ends with (the best or the last)."""
        if not self.history:
            return None
        epoch = self.best_epoch if self.best_epoch is not None else self.history[-1]["epoch"]
        return next(entry for entry in self.history if entry["epoch"] == epoch)


def _log_validation(accelerator, entry: dict, grid: PIL.Image.Image, step: int) -> None:
    """The scores (``validation/<name>``) and the before/after grid (``validation/grid``) to the trackers."""
    if not accelerator.trackers:
        return
    accelerator.log(
        {**{f"validation/{k}": v for k, v in entry.items() if k != "epoch"}, "epoch": entry["epoch"]}, step
    )
    array = np.asarray(grid)  # HWC uint8
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":  # SummaryWriter.add_images: a batch, NCHW unless told otherwise
            tracker.log_images({"validation/grid": array[None]}, step=step, dataformats="NHWC")
        elif "log_images" in type(tracker).__dict__:  # the others that log images take a list of HWC arrays
            tracker.log_images({"validation/grid": [array]}, step=step)


def _build_validation(pipe, x_val, prompt_src, prompt_tar, config: FinetuneConfig, device, every, keep_best, min_ssim):
    """The run's `_Validation`: the held-out images' latents by the original model (every adapter bypassed), with
    the run's ``t0``, inversion steps, fixed-point iterations, encoding (noise seeded by ``config.seed``) and
    conditioning prompt; the edits regenerate them in ``config.num_train_steps`` steps, as training does."""
    x_val = x_val.to(device)
    prompt = config.conditioning_prompt or None
    generator = torch.Generator().manual_seed(config.seed)  # for encoding="noise"; not the run's generator
    with _progress_bars_off(pipe):
        x_t0 = torch.cat([
            pipe.invert(
                x_val[start : start + config.batch_size], t0=config.t0, num_inversion_steps=config.num_inversion_steps,
                num_fixed_point_iterations=config.num_fixed_point_iterations, prompt=prompt, encoding=config.encoding,
                generator=generator,
            ).x_t0
            for start in range(0, x_val.shape[0], config.batch_size)
        ])  # fmt: skip
    return _Validation(
        pipe, x_val, x_t0, prompt_src, prompt_tar, evaluation.scoring_losses(pipe),
        dict(t0=config.t0, num_inference_steps=config.num_train_steps, prompt=prompt), config.batch_size,
        every, keep_best, min_ssim,
    )  # fmt: skip


def _check_validation(
    pipe, validation_images, validation_epochs, keep_best, keep_best_min_ssim, report_to, logging_dir, accelerator,
    resume_from,
):  # fmt: skip
    """The validation and tracking arguments, before any work; returns ``keep_best_min_ssim`` as a float."""
    check_positive_int(validation_epochs, "validation_epochs")
    if keep_best is not None:
        check_choice(keep_best, "keep_best", KEEP_BEST)
        if validation_images is None:
            raise ValueError(
                f"`keep_best`={keep_best!r} needs `validation_images`, the held-out images whose scores pick the "
                "epoch."
            )
        if keep_best == "s_dir_2" and pipe.clip_model_2 is None:
            raise ValueError("`keep_best`='s_dir_2' needs a second CLIP (`clip_model_2`); this pipeline has one.")
    if keep_best_min_ssim is not None:
        keep_best_min_ssim = check_number(keep_best_min_ssim, "keep_best_min_ssim", minimum=-1, maximum=1)
        if keep_best is None:
            raise ValueError(
                f"`keep_best_min_ssim`={keep_best_min_ssim} is a floor for `keep_best`; pass `keep_best` too."
            )
    if resume_from is not None and validation_images is not None:
        raise ValueError(
            "`validation_images` cannot be combined with `resume_from` yet: a checkpoint holds neither the validation "
            "history nor the best epoch's weights. Resume without `validation_images` (validation never changes "
            "training, so the adapter is still bit for bit the uninterrupted run's), or start the run again."
        )
    check_report_to(report_to, logging_dir, accelerator)
    return keep_best_min_ssim


def check_report_to(report_to: str | None, logging_dir=None, accelerator=None) -> None:
    """Checks `finetune`'s ``report_to`` and ``logging_dir`` (see there) before any work: a tracker accelerate knows,
    whose package is installed (`ImportError` otherwise), a folder when it needs one, and no ``accelerator`` of the
    caller's (whose trackers are the caller's to set up)."""
    if logging_dir is not None:
        if not isinstance(logging_dir, (str, os.PathLike)):
            raise TypeError(
                f"`logging_dir` must be a folder path (str or os.PathLike), got {short_repr(logging_dir)}."
            )
        if report_to is None:
            raise ValueError(f"`logging_dir` {os.fspath(logging_dir)!r} is only used with `report_to`; pass both.")
        if os.path.exists(logging_dir) and not os.path.isdir(logging_dir):
            raise ValueError(f"`logging_dir` {os.fspath(logging_dir)!r} exists and is not a folder.")
    if report_to is None:
        return
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    check_choice(report_to, "report_to", tuple(LOGGER_TYPE_TO_CLASS))
    if accelerator is not None:
        raise ValueError(
            f"`report_to`={report_to!r} sets up the trackers of the accelerator `finetune` creates; with your own "
            "`accelerator`, create it with `log_with=` and call its `init_trackers`: its trackers get the same logs."
        )
    packages = TRACKER_PACKAGES.get(report_to, (report_to,))
    if not any(importlib.util.find_spec(package) is not None for package in packages):
        raise ImportError(
            f"`report_to`={report_to!r} needs the {packages[0]!r} package, which is not installed: "
            f"`pip install {packages[0]}`."
        )
    if LOGGER_TYPE_TO_CLASS[report_to].requires_logging_directory and logging_dir is None:
        raise ValueError(f"`report_to`={report_to!r} writes its logs to a folder: pass `logging_dir`.")


def _tracker_config(config: FinetuneConfig, prompt_src: str, prompt_tar: str, **extra) -> dict:
    """The run's settings as the scalars (int, float, str, bool) every tracker stores as hyperparameters."""
    values = {**asdict(config), "prompt_src": prompt_src, "prompt_tar": prompt_tar, **extra}
    return {
        k: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else "none" if v is None else v
        for k, v in values.items()
    }


# ---- the run -------------------------------------------------------------------------------------------------


def _check_inputs(pipe, prompt_src, prompt_tar, config, adapter_name, identity_loss, source_images, target_images):
    check_prompt(prompt_src, "prompt_src")
    check_prompt(prompt_tar, "prompt_tar")
    if not isinstance(config, FinetuneConfig):
        raise TypeError(f"`config` must be a FinetuneConfig or None, got {type(config).__name__}.")
    if (source_images is None) != (target_images is None):
        raise ValueError("Pass both `source_images` and `target_images` for an image-guided direction, or neither.")
    check_adapter_name(adapter_name)
    if adapter_name in adapter_names(pipe.unet):
        raise ValueError(f"The UNet already has an adapter named {adapter_name!r}; pick another `adapter_name`.")
    if identity_loss is not None:
        check_callable(identity_loss, "identity_loss")
    elif config.identity_loss_weight > 0:
        raise ValueError("`identity_loss_weight` > 0 needs an `identity_loss` callable.")
    check_timestep(config.t0, "t0", pipe.num_train_timesteps)
    if config.conditioning_prompt and pipe.text_encoder is None:
        raise ValueError(
            f"`conditioning_prompt` needs a text-conditioned UNet; this one is unconditional: "
            f"{config.conditioning_prompt!r}."
        )


def _check_checkpointing(checkpoint_dir, checkpoint_every, resume_from) -> None:
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


def _same_prompts(prompt_src: str, prompt_tar: str) -> bool:
    return prompt_src.strip().lower() == prompt_tar.strip().lower()


def _warn_if_same_prompts(prompt_src, prompt_tar, config, text_direction: bool) -> None:
    if text_direction and config.clip_loss_weight > 0 and _same_prompts(prompt_src, prompt_tar):
        warnings.warn(
            f"`prompt_src` and `prompt_tar` are the same ({prompt_src.strip()!r}): the text direction is zero, so "
            "the directional CLIP loss is constant and nothing will be learnt from it.",
            UserWarning,
            stacklevel=3,
        )


def _warn_about_unknown_words(pipe, prompt_src, prompt_tar, config, text_direction: bool) -> None:
    """One warning per prompt the CLIP loss uses that has words a CLIP tokenizer does not know (`unknown_words`)."""
    used = [("prompt_src", prompt_src), ("prompt_tar", prompt_tar)] if text_direction else []
    if config.global_clip_loss_weight > 0 and not text_direction:
        used.append(("prompt_tar", prompt_tar))
    for name, prompt in used:
        words = []
        for _, tokenizer in pipe.clip_models:
            words += [w for w in unknown_words(tokenizer, prompt) if w not in words]
        if words:
            warnings.warn(
                f"`{name}` {prompt!r} has words the CLIP tokenizer does not know: {words} (they fall back to single "
                "characters, which carry little meaning for CLIP); the direction may not be what you meant.",
                UserWarning,
                stacklevel=3,
            )


def _prepare_direction_images(pipe, source_images, target_images):
    if source_images is None:
        return None
    return pipe.prepare_image(source_images, "source_images"), pipe.prepare_image(target_images, "target_images")


@dataclass
class _UNetState:
    """What a run changes on the UNet besides adding its adapter, taken before it: the adapters' active state (active
    set, scales, enabled flag), every parameter's ``requires_grad``, the train/eval mode and gradient checkpointing."""

    adapters: object
    requires_grad: list[tuple[torch.nn.Parameter, bool]]
    training: bool
    checkpointing: bool

    @classmethod
    def of(cls, unet) -> _UNetState:
        requires_grad = [(p, p.requires_grad) for p in unet.parameters()]
        return cls(lora.active_state(unet), requires_grad, unet.training, bool(unet.is_gradient_checkpointing))

    def restore_modes(self, unet) -> None:
        """Train/eval mode and gradient checkpointing as they were (after a run, failed or not)."""
        unet.train(self.training)
        if unet.is_gradient_checkpointing and not self.checkpointing:
            unet.disable_gradient_checkpointing()

    def discard(self, unet, adapter_name: str) -> None:
        """Removes the new adapter and restores the previous adapters exactly (after a failed run)."""
        if adapter_name in adapter_names(unet):
            with warnings.catch_warnings():  # peft's "Adapter ... was active which is now deleted": restored below
                warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
                lora.remove_adapter(unet, adapter_name)
        lora.restore_active_state(unet, self.adapters)
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _frozen_decoders(pipe, loss_fn: FinetuneLoss, config: FinetuneConfig):
    """The autoencoders the loss decodes through get no gradients of their own (and, if asked, recompute their
    activations in backward); both as before afterwards."""
    modules = [m for m in {id(m): m for m in (pipe.autoencoder, loss_fn.decoder) if m is not None}.values()]
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    checkpointing = [(m, bool(getattr(m, "is_gradient_checkpointing", False))) for m in modules]
    for p, _ in flags:
        p.requires_grad_(False)
    if config.decoder_gradient_checkpointing:
        for m in modules:
            if getattr(m, "_supports_gradient_checkpointing", False):
                m.enable_gradient_checkpointing()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, was in checkpointing:
            if m.is_gradient_checkpointing and not was:
                m.disable_gradient_checkpointing()


def _train_adapter(
    pipe, adapter_name, loss_fn, x0, x_t0, config, accelerator, generator, state, checkpoints=None, resume=None,
    validation=None,
) -> list[float]:  # fmt: skip
    """Trains the freshly added adapter (float32 weights, even on a half-precision UNet, as
    `diffusers.training_utils.cast_training_params` does), from the weights of ``resume`` if given; leaves its weights
    frozen and the UNet's modes as before."""
    unet, step = pipe.unet, None
    params = adapter_parameters(unet, adapter_name)
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()
    try:
        if resume is not None:
            resume.load_adapter_weights(unet, adapter_name)
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        step = TrainStep(unet, params, config, accelerator)
        step.condition = pipe.encode_prompt(config.conditioning_prompt, config.batch_size)
        unet.train()
        with _frozen_decoders(pipe, loss_fn, config):
            return _train(pipe, step, loss_fn, x0, x_t0, config, generator, checkpoints, resume, validation)
    finally:
        if step is not None:
            step.close()
        state.restore_modes(unet)
        for p in params:
            p.requires_grad_(False)
        accelerator.wait_for_everyone()


def _provenance(prompt_src, prompt_tar, direction_images, loss_fn: FinetuneLoss, config: FinetuneConfig) -> dict:
    """What the adapter's file records about its training (the latent and EffDiff settings only where they apply)."""
    extra = {}
    if config.encoding != "ddim":
        extra["encoding"] = config.encoding
    if loss_fn.decode is not None:  # a latent model
        extra.update(conditioning_prompt=config.conditioning_prompt, l1_space=config.l1_space)
        extra["loss_decoder"] = type(loss_fn.decoder).__name__
    return {
        **extra,
        **{
            "prompt_src": prompt_src,
            "prompt_tar": prompt_tar,
            "direction": "images" if direction_images is not None else "text",
            "num_clip_models": len(loss_fn.clip_losses),
            "t0": config.t0,
            "num_inversion_steps": config.num_inversion_steps,
            "num_fixed_point_iterations": config.num_fixed_point_iterations,
            "num_train_steps": config.num_train_steps,
            "num_epochs": config.num_epochs,
            "learning_rate": config.learning_rate,
            "scheme": config.scheme,
            "seed": config.seed,
            "package_version": __version__,
        },
    }


def finetune(
    pipe,
    prompt_src: str,
    prompt_tar: str,
    images=None,
    config: FinetuneConfig | None = None,
    adapter_name: str = "default",
    identity_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    source_images=None,
    target_images=None,
    cache_dir: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume_from: str | os.PathLike | None = None,
    accelerator=None,
    loss_vae=None,
    validation_images=None,
    validation_epochs: int = 1,
    keep_best: str | None = None,
    keep_best_min_ssim: float | None = None,
    report_to: str | None = None,
    logging_dir: str | os.PathLike | None = None,
) -> FinetuneOutput:
    r"""
    Trains a new LoRA adapter ``adapter_name`` on ``pipe.unet`` so that editing moves images from ``prompt_src`` to
    ``prompt_tar`` (DiffusionCLIP, arXiv 2110.02711, Sec. 3.2: directional CLIP loss plus an L1 identity term on
    latents precomputed by DDIM inversion). `DiffusionCLIPPipeline.finetune` calls this.

    The run is all or nothing: if anything raises after the adapter was added (`NonFiniteLossError`, an exception or
    a `KeyboardInterrupt` from a loss or callback), the new adapter is removed, the UNet's previous adapters are
    restored exactly (names, active set, scales, enabled flag) and the error is re-raised. On success the new adapter
    is the only active one, its weights are frozen, and its provenance (prompts, settings, package version) is
    recorded with `lora.set_provenance`.

    Device and dtype: the whole pipeline is moved to the accelerator's device (``pipe.to(accelerator.device)``; the
    CPU for a CPU pipeline when no ``accelerator`` is given, else accelerate's device) and stays there. The base
    weights are never changed; on a UNet in fp16 or bf16, the new adapter's weights are created in float32 (as
    `diffusers.training_utils.cast_training_params` does) so that Adam and the `GradScaler` update float32 weights.

    Args:
        pipe ([`DiffusionCLIPPipeline`]): The pipeline whose UNet gets the adapter.
        prompt_src (`str`): Text describing the source domain, e.g. ``"face"``.
        prompt_tar (`str`): Text describing the target, e.g. ``"smiling face"``.
        images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*):
            Training images (any form `pipe.invert` accepts). `None` samples ``config.num_sampled_images`` images
            from the original model (seeded DDIM).
        config ([`FinetuneConfig`], *optional*): The settings; the defaults if `None`.
        adapter_name (`str`, *optional*, defaults to `"default"`): Name of the new adapter (letters, digits, ``_``
            and ``-``); it must not exist yet.
        identity_loss (`Callable`, *optional*): ``fn(x0_source, x0_pred) -> per-sample loss`` (e.g. a face identity
            loss), weighted by ``config.identity_loss_weight``.
        source_images / target_images (*optional*): Image-guided direction (both or neither): the mean difference of
            the two sets' CLIP image embeddings replaces the text direction.
        cache_dir (`str` or `os.PathLike`, *optional*): Folder for the precomputed latents (see `precompute_latents`).
        checkpoint_dir (`str` or `os.PathLike`, *optional*): Folder for a resumable checkpoint, written every
            ``checkpoint_every`` optimizer steps to ``checkpoint_dir/checkpoint-latest/`` (only the latest is kept;
            the new one replaces it atomically, so a kill at any moment leaves the previous complete one). It holds
            the adapter (``pytorch_lora_weights.safetensors``, loadable with `load_lora_weights`), the optimizer's
            tensors (``optimizer.safetensors``), the random states (``random_states.safetensors``: the shuffling
            generator, each CLIP loss's view generator, torch's global generator) and ``trainer_state.json`` (epoch,
            batch and step counters, the loss history, the optimizer's other state, the `GradScaler`'s state, the
            settings and fingerprints, and every file's SHA-256). Safetensors and JSON only, never pickle.
        checkpoint_every (`int`, *optional*): Optimizer steps between checkpoints (needs ``checkpoint_dir``, and
            vice versa). Checkpoints are taken at batch ends with no gradients pending: with ``scheme="efficient"``
            (an optimizer step per generation step) the count is rounded up to the end of the batch, and with
            ``gradient_accumulation_steps`` > 1 to the next batch end that is also an accumulation boundary.
        resume_from (`str` or `os.PathLike`, *optional*): A checkpoint folder (or a ``checkpoint_dir``) to continue
            from: the final adapter and the loss history are then bit for bit those of an uninterrupted run (same
            device and software). The settings (every `FinetuneConfig` field), prompts, training images and their
            latents, the CLIP direction and the base UNet must be the checkpoint's, else `ValueError` naming what
            differs, before training; a truncated or corrupt checkpoint is a `ValueError` too. Not supported with
            several processes yet.
        accelerator (`accelerate.Accelerator`, *optional*): For multi-process (DDP) training; by default a
            single-process one with ``config.gradient_accumulation_steps``.
        loss_vae ([`~diffusers.AutoencoderTiny`], *optional*): Latent models only: a smaller decoder of the same
            latent space (e.g. TAESD, ``madebyollin/taesd`` for SD 1.x / 2.x) that decodes ``x0_hat`` for the loss
            instead of the pipeline's autoencoder (frozen; editing still decodes with the pipeline's own).

        validation_images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*):
            Held-out images (any form `pipe.invert` accepts) to validate on, as diffusers' training scripts do: at the
            end of every ``validation_epochs``-th epoch and after the last one, they are edited with the adapter as it
            is then (`pipe.edit` with the run's ``t0``, ``num_train_steps`` generation steps from their ``x_t0``,
            which the original model computes once, before training, with the run's inversion settings and
            ``encoding``) and scored against the images as the model sees them (`evaluation.score_edits`):
            ``s_dir`` (directional CLIP similarity with the training CLIP), ``s_dir_2`` (with `clip_model_2`, when
            the pipeline has one), ``mae`` and ``ssim`` (how much of the image the edit kept) and ``clip_score``
            (mean cosine between the edits' CLIP image embeddings and the target text's). The scores go to
            `FinetuneOutput.validation`, the progress bar and the trackers (``report_to``). Validation never changes
            training (no gradients; torch's random state forked; the shuffling and CLIP-view generators untouched):
            the adapter is bit for bit the one of a run without it. Not combinable with ``resume_from`` yet.
        validation_epochs (`int`, *optional*, defaults to 1): Validate after every k-th epoch (and after the last).
        keep_best (`str`, *optional*): Keep the adapter weights of the best validated epoch instead of the last
            one's: ``"s_dir"``, ``"s_dir_2"``, ``"clip_score"`` or ``"ssim"`` (the largest wins) or ``"mae"`` (the
            smallest wins); on a tie, the earlier epoch. The weights are copied at validation time and set back
            exactly at the end; `FinetuneOutput.best_epoch` says which epoch. Needs ``validation_images``.
        keep_best_min_ssim (`float`, *optional*): An identity floor for ``keep_best``: epochs whose ``ssim`` is
            below it are not eligible. If none is, the epoch with the highest ``ssim`` is kept, with a warning.
        report_to (`str`, *optional*): An accelerate tracker (``"tensorboard"``, ``"wandb"``, ...; its package must
            be installed, else `ImportError` before any work) for the loss of every batch (``train/loss``), the
            validation scores (``validation/<name>``) and each validation's before/after grid (``validation/grid``),
            all at the optimizer-step count; the settings are stored as its hyperparameters. Only with the accelerator
            `finetune` creates: with your own ``accelerator``, initialise its trackers yourself (they get the same
            logs).
        logging_dir (`str` or `os.PathLike`, *optional*): The trackers' folder (needed by ``"tensorboard"``: the
            events go to ``logging_dir/diffusionclip-finetune/``).

    Latent models (LDM, Stable Diffusion): training runs on the latents; the predicted ``x0`` is decoded with
    gradients (``config.decoder_gradient_checkpointing`` trades time for memory) for the CLIP loss and, with
    ``config.l1_space="pixel"`` (the default: the same weight means the same as for pixel models), for the L1 term
    against the input image; ``"latent"`` takes L1 between the latents instead. A text-conditioned UNet is
    conditioned on ``config.conditioning_prompt`` (empty by default), for the inversion and the training alike.

    Returns:
        [`FinetuneOutput`]: the adapter name, the loss of every optimizer step and, with ``validation_images``, the
        validation scores of every validated epoch, the epoch kept (``keep_best``) and the grid of the edits.

    Examples:

    ```py
    >>> from diffusionclip_pipeline.finetune import FinetuneConfig, finetune

    >>> out = finetune(pipe, "face", "smiling face", images=faces, config=FinetuneConfig(num_epochs=5))
    >>> edited = pipe.edit(faces[0], t0=500).images[0]

    >>> # validate on held-out faces after every epoch, keep the epoch whose edits follow the text best
    >>> out = finetune(
    ...     pipe, "face", "smiling face", images=faces, adapter_name="smile", validation_images=held_out,
    ...     keep_best="s_dir", keep_best_min_ssim=0.6, report_to="tensorboard", logging_dir="logs",
    ... )
    >>> out.best_epoch, out.validation[out.best_epoch - 1]
    ```
    """
    from accelerate import Accelerator

    # 1. Check inputs (before any work), the checkpoint to resume from and its settings; prepare the images
    config = FinetuneConfig() if config is None else config
    _check_inputs(pipe, prompt_src, prompt_tar, config, adapter_name, identity_loss, source_images, target_images)
    _check_checkpointing(checkpoint_dir, checkpoint_every, resume_from)
    keep_best_min_ssim = _check_validation(
        pipe, validation_images, validation_epochs, keep_best, keep_best_min_ssim, report_to, logging_dir, accelerator,
        resume_from,
    )  # fmt: skip
    _warn_if_same_prompts(prompt_src, prompt_tar, config, text_direction=source_images is None)
    resume = read_checkpoint(resume_from) if resume_from is not None else None
    settings = None
    if checkpoint_dir is not None or resume is not None:
        settings = _config_settings(config, prompt_src, prompt_tar)
        if resume is not None:
            _check_settings(resume.settings, settings, resume.path)
    x0 = pipe.prepare_image(images, name="images") if images is not None else None
    direction_images = _prepare_direction_images(pipe, source_images, target_images)
    x_val = pipe.prepare_image(validation_images, name="validation_images") if validation_images is not None else None

    # 2. Device: the accelerator's; the pipeline moves there and stays
    if accelerator is None:
        on_cpu = pipe.unet.device.type == "cpu"
        trackers = {} if report_to is None else {"log_with": report_to, "project_dir": logging_dir}
        accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps, cpu=on_cpu, **trackers
        )
    if settings is not None and accelerator.num_processes > 1:
        raise ValueError("`checkpoint_dir` and `resume_from` are not supported with several processes yet.")
    device = accelerator.device
    pipe.to(device)
    if settings is not None:
        settings.update(_model_settings(pipe))
        if resume is not None:
            _check_settings(resume.settings, settings, resume.path)

    # 3. Losses, training images (given or sampled) and their latents x_t0 (once, no grad, reused across epochs)
    loss_fn = build_losses(pipe, config, prompt_src, prompt_tar, direction_images, identity_loss, device, loss_vae)
    _warn_about_unknown_words(pipe, prompt_src, prompt_tar, config, text_direction=direction_images is None)
    generator = torch.Generator().manual_seed(config.seed)  # sampled images' noise first, then the shuffling
    x0 = training_images(pipe, x0, config, device, generator)
    x_t0, hits = precompute_latents(
        pipe, x0, config.t0, config.num_inversion_steps, config.batch_size, cache_dir,
        num_fixed_point_iterations=config.num_fixed_point_iterations, prompt=config.conditioning_prompt,
        encoding=config.encoding, generator=generator,
    )  # fmt: skip
    checkpoints = None
    if settings is not None:
        settings.update(_data_settings(loss_fn, x0, x_t0))
        if resume is not None:
            _check_settings(resume.settings, settings, resume.path)
        if checkpoint_dir is not None:
            checkpoints = _Checkpointer(os.fspath(checkpoint_dir), checkpoint_every, pipe.unet, adapter_name, settings)
            checkpoints.last = resume.num_updates if resume is not None else 0
    validation = None
    if x_val is not None:  # the held-out images' latents, by the original model, once
        validation = _build_validation(
            pipe, x_val, prompt_src, prompt_tar, config, device, validation_epochs, keep_best, keep_best_min_ssim
        )

    # 4. The new adapter (identical init on every process: same seed); from here on, any error removes it again and
    #    restores the previous adapters. Training draws from torch's global generator (if at all) inside the same
    #    seeded fork: reproducible from the seed, restorable from a checkpoint, and the caller's state is untouched.
    unet = pipe.unet
    state = _UNetState.of(unet)
    try:
        if report_to is not None:  # the trackers of the accelerator made here (a caller's own are the caller's)
            extra = dict(
                validation_epochs=validation_epochs, keep_best=keep_best, keep_best_min_ssim=keep_best_min_ssim
            )
            accelerator.init_trackers(TRACKER_PROJECT, config=_tracker_config(config, prompt_src, prompt_tar, **extra))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(config.seed)
            add_adapter(unet, config.lora, adapter_name)
            # 5. Train it (from the checkpoint's weights, optimizer and random states when resuming), validating
            loss_history = _train_adapter(
                pipe, adapter_name, loss_fn, x0, x_t0, config, accelerator, generator, state, checkpoints, resume,
                validation,
            )  # fmt: skip
        # 6. Record where it came from (and how it scored)
        provenance = _provenance(prompt_src, prompt_tar, direction_images, loss_fn, config)
        if validation is not None:
            provenance["validation"] = validation.kept_scores
            if keep_best is not None:
                provenance.update(keep_best=keep_best, best_epoch=validation.best_epoch)
        lora.set_provenance(unet, adapter_name, provenance)
    except BaseException:
        state.discard(unet, adapter_name)
        raise
    finally:
        if report_to is not None:
            for tracker in accelerator.trackers:
                tracker.finish()
    return FinetuneOutput(
        adapter_name=adapter_name, loss_history=loss_history, config=config, num_cached_latents=hits,
        num_clip_models=len(loss_fn.clip_losses), validation=list(validation.history) if validation else [],
        best_epoch=validation.best_epoch if validation else None,
        validation_grid=validation.grid if validation else None,
    )  # fmt: skip

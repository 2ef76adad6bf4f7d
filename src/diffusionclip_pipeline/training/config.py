"""The settings and the result of a fine-tuning run: `FinetuneConfig` (validated on construction, as peft's configs),
`FinetuneOutput` and `NonFiniteLossError`. No training code: the commands read the fields' help from here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import PIL.Image
from diffusers.utils import BaseOutput

from ..choices import ENCODINGS, L1_SPACES, LOSS_TYPES, LOSS_WEIGHTS, MIXED_PRECISION, SCHEMES
from ..families.base import DEFAULT_TARGET_MODULES
from ..loaders.lora_state import LoraSettings
from ..utils.checks import (
    check_bool,
    check_choice,
    check_int,
    check_non_negative_int,
    check_number,
    check_positive_int,
    check_prompt_or_empty,
)

__all__ = ["FinetuneConfig", "FinetuneOutput", "NonFiniteLossError"]


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
    num_train_steps: int = field(
        default=6,
        metadata={
            "help": "DDIM generation steps per image during training (the chain x_t0 -> x0; not optimizer steps)."
        },
    )
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
        training_scores (`list[dict]`): With early stopping on the training images (``early_stopping_on=
            "training"``, the default without ``validation_images``): the same scores as ``validation``, of the
            training images edited from their own latents (the proxy); empty otherwise.
        stopped_early (`bool`): Whether the run stopped before ``config.num_epochs`` (early stopping or
            ``callback_on_epoch_end``).
        stop_reason (`str`): Why the run ended, e.g. ``"trained the `num_epochs`=15 epochs"`` or ``"early stopping
            after epoch 6: `s_dir` has not improved by more than 0 for 2 validation(s) (best 0.4102 at epoch 4)"``.
        baseline (`dict`, *optional*): With scores (validation or the proxy): the scores of the adapter at zero,
            before the first epoch (``"epoch"`` 0), the reference of ``flat_warning``.
        flat_warning (`str`, *optional*): The warning given when the direction score stayed flat over the first
            epochs (training is doing nothing), else `None`.
    """

    adapter_name: str
    loss_history: list[float]
    config: FinetuneConfig
    num_cached_latents: int = 0
    num_clip_models: int = 1
    validation: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    validation_grid: PIL.Image.Image | None = None
    training_scores: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    stop_reason: str | None = None
    baseline: dict | None = None
    flat_warning: str | None = None


class NonFiniteLossError(FloatingPointError):
    """The loss, a gradient, the adapter's weights or the adapted UNet's prediction became NaN/inf. `finetune` then
    discards the new adapter and restores the adapters the UNet had before the call."""


_DISCARDED = "the new adapter is discarded and the previous adapters restored"
_HINT = "a lower `learning_rate`, a `max_grad_norm` or `mixed_precision='no'` may help"


def diverged(what: str) -> NonFiniteLossError:
    """The error of a run that diverged: ``what`` happened, then what `finetune` does about it and what may help."""
    return NonFiniteLossError(f"{what}; {_DISCARDED} ({_HINT}).")

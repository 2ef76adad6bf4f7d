"""`DiffusionCLIPPipeline`: text-driven editing of real images (Kim, Kwon, Ye, CVPR 2022, arXiv 2110.02711)."""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from diffusers import (
    AutoencoderKL,
    DDIMInverseScheduler,
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import logging, replace_example_docstring

from .choices import ENCODINGS
from .families import ModelFamily, check_components, check_layout, check_loaded
from .families.unet_adapter_api import adapter_view, plain_unet
from .image_processing import postprocess_image
from .loaders import DiffusionCLIPLoraLoaderMixin, lora_file, lora_state
from .noise_mixing import MixComponent, build_mix
from .pipeline_clip import DEFAULT_CLIP, DiffusionCLIPClipMixin
from .pipeline_conveniences import DiffusionCLIPConveniencesMixin
from .pipeline_inputs import DiffusionCLIPInputsMixin
from .pipeline_output import (
    DiffusionCLIPInversionOutput,
    DiffusionCLIPPipelineOutput,
)
from .pipeline_translate import DiffusionCLIPTranslationMixin
from .pipeline_utils import (  # noqa: F401  (NoAdapterWarning, NonFiniteResultError: re-exported)
    NoAdapterWarning,
    NonFiniteResultError,
    _align_tensors,
    _check_finite_result,
    _concat_conditions,
    _lora_scale,
    _renamed_kwargs,
    batch_size_of,
    check_image,
)
from .utils.checks import (
    check_choice,
    check_number,
)
from .utils.io import atomic_directory
from .utils.locking import holds_unet_lock
from .utils.logging import LogProgress

if TYPE_CHECKING:  # training is imported only when `finetune` runs: inference never loads it
    from .training import FinetuneConfig, FinetuneOutput

logger = logging.get_logger(__name__)


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from diffusionclip_pipeline import DiffusionCLIPPipeline
        >>> from transformers import CLIPModel, CLIPTokenizer

        >>> clip = CLIPModel.from_pretrained("openai/clip-vit-base-patch16")
        >>> tokenizer = CLIPTokenizer.from_pretrained("openai/clip-vit-base-patch16")
        >>> pipe = DiffusionCLIPPipeline.from_pretrained(
        ...     "google/ddpm-celebahq-256", clip_model=clip, clip_tokenizer=tokenizer
        ... ).to("cuda")
        >>> pipe.finetune("face", "smiling face", images=train_images)
        >>> edited = pipe.edit(image, t0=500).images[0]
        ```
"""


class DiffusionCLIPPipeline(
    DiffusionPipeline,
    DiffusionCLIPInputsMixin,
    DiffusionCLIPLoraLoaderMixin,
    DiffusionCLIPClipMixin,
    DiffusionCLIPConveniencesMixin,
    DiffusionCLIPTranslationMixin,
):
    r"""
    Pipeline for DiffusionCLIP: DDIM-invert real images to a middle timestep ``t0`` and regenerate them with a UNet
    fine-tuned (here with LoRA) by a directional CLIP loss (Kim, Kwon, Ye, CVPR 2022, arXiv 2110.02711).

    With an unmodified UNet, `edit` reconstructs its input (the paper's "reconstruction" mode).

    Args:
        unet ([`UNet2DModel`] or [`UNet2DConditionModel`], *optional*): The denoiser of a noise-prediction model
            (e.g. `google/ddpm-celebahq-256`'s). The pipeline holds a view of a plain `UNet2DModel` with diffusers'
            adapter API (the same weight tensors, the same type; the object given is not changed); it is saved as a
            plain `UNet2DModel`. Adapters: see [`DiffusionCLIPLoraLoaderMixin`]. Exactly one of ``unet`` and
            ``transformer``.
        scheduler ([`DDIMScheduler`] or [`FlowMatchEulerDiscreteScheduler`]): Generation scheduler. With a ``unet``,
            any scheduler is converted to a `DDIMScheduler` from its config, with ``clip_sample=False``; with a
            flow-matching ``transformer`` it must be a `FlowMatchEulerDiscreteScheduler` (docs/flow.md).
        inverse_scheduler ([`DDIMInverseScheduler`], *optional*): Inversion scheduler; built from the scheduler's
            config (``clip_sample=False``) when not given.
        clip_model ([`~transformers.CLIPModel`], *optional*): CLIP for the directional loss; loaded lazily from
            `clip_model_name_or_path` (default ``"openai/clip-vit-base-patch16"``) when fine-tuning needs it.
        clip_tokenizer ([`~transformers.CLIPTokenizer`], *optional*): CLIP's tokenizer.
        clip_model_2 ([`~transformers.CLIPModel`], *optional*): A second CLIP. Fine-tuning then averages the CLIP
            loss over both models (an ensemble, as StyleGAN-NADA's ViT-B/32 + ViT-B/16): an edit must satisfy two
            embedding spaces, so it cannot exploit the blind spots of one. Never loaded implicitly.
        clip_tokenizer_2 ([`~transformers.CLIPTokenizer`], *optional*): The second CLIP's tokenizer (both or
            neither).
        vae ([`AutoencoderKL`], *optional*): Stable Diffusion's autoencoder: inversion and editing then run on its
            latents (see `autoencoder`: the posterior mean times ``scaling_factor``, deterministic).
        vqvae ([`VQModel`], *optional*): The autoencoder of an unconditional latent diffusion model (`LDMPipeline`,
            e.g. ``CompVis/ldm-celebahq-256``). At most one of ``vae`` and ``vqvae``.
        text_encoder ([`~transformers.CLIPTextModel`], *optional*): Encodes the prompt a text-conditioned UNet
            (`UNet2DConditionModel`, Stable Diffusion) is conditioned on while inverting and regenerating; not the
            CLIP of the loss, which must also see images (``clip_model``).
        tokenizer ([`~transformers.CLIPTokenizer`], *optional*): The text encoder's tokenizer.
        text_encoder_2 ([`~transformers.CLIPTextModelWithProjection`], *optional*), tokenizer_2
            ([`~transformers.CLIPTokenizer`], *optional*): SDXL's second text encoder and its tokenizer.
        image_encoder, feature_extractor (*optional*): SDXL's optional IP-Adapter components: kept, not used.
        force_zeros_for_empty_prompt (`bool`, *optional*, defaults to `True`): SDXL: the unconditional input of
            classifier-free guidance is zeros (as `StableDiffusionXLPipeline` does) rather than the empty prompt.
        clip_model_name_or_path (`str`, *optional*): Where `load_clip` loads CLIP from when fine-tuning needs it
            (default ``"openai/clip-vit-base-patch16"``); saved with the pipeline.
        transformer ([`SD3Transformer2DModel`], *optional*): The denoiser of a flow-matching model (Stable Diffusion
            3 / 3.5): inversion and editing are then Euler steps on its shifted sigma grid (docs/flow.md), with the
            ``vae``, ``text_encoder`` + ``text_encoder_2`` (`CLIPTextModelWithProjection`) and their tokenizers.
            A `FluxTransformer2DModel` (Flux.1) takes the `FluxPipeline` layout (docs/flow.md, "The Flux family").
        text_encoder_3 ([`~transformers.T5EncoderModel`], *optional*), tokenizer_3 (*optional*): SD3's T5 and its
            tokenizer; without them (as `StableDiffusion3Pipeline` allows) the T5 part of the conditioning is zeros.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->unet->transformer->vae"
    _callback_tensor_inputs = ["latents", "pred_original_sample", "prompt_embeds"]
    _optional_components = [
        "inverse_scheduler", "clip_model", "clip_tokenizer", "clip_model_2", "clip_tokenizer_2", "vae", "vqvae",
        "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "image_encoder", "feature_extractor",
        "unet", "transformer", "scheduler", "text_encoder_3", "tokenizer_3",
    ]  # components (a keyword with a default is a config value to diffusers' loader unless listed here)  # fmt: skip

    def __init__(
        self,
        unet: UNet2DModel | UNet2DConditionModel | None = None,
        scheduler: DDIMScheduler | FlowMatchEulerDiscreteScheduler | None = None,
        inverse_scheduler: DDIMInverseScheduler | None = None,
        clip_model=None,
        clip_tokenizer=None,
        vae: AutoencoderKL | None = None,
        clip_model_2=None,
        clip_tokenizer_2=None,
        vqvae: VQModel | None = None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt: bool = True,
        clip_model_name_or_path: str | None = None,
        transformer: SD3Transformer2DModel | FluxTransformer2DModel | None = None,
        text_encoder_3=None,
        tokenizer_3=None,
    ):
        super().__init__()
        family = check_components(
            unet, vae=vae, vqvae=vqvae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2, transformer=transformer, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
        )  # fmt: skip
        if scheduler is None:
            raise ValueError("Pass the `scheduler` the denoiser was trained with.")
        if (clip_model_2 is None) != (clip_tokenizer_2 is None):
            raise ValueError(
                "Pass both `clip_model_2` and `clip_tokenizer_2` for a second CLIP, or neither; got "
                f"clip_model_2={type(clip_model_2).__name__}, clip_tokenizer_2={type(clip_tokenizer_2).__name__}."
            )
        if unet is not None:
            unet = adapter_view(unet)  # the caller's model keeps its type (a plain UNet2DModel gets a view)
        scheduler, inverse_scheduler = family.prepare_schedulers(scheduler, inverse_scheduler)
        self.register_modules(
            unet=unet,
            transformer=transformer,
            scheduler=scheduler,
            inverse_scheduler=inverse_scheduler,
            clip_model=clip_model,
            clip_tokenizer=clip_tokenizer,
            vae=vae,
            clip_model_2=clip_model_2,
            clip_tokenizer_2=clip_tokenizer_2,
            vqvae=vqvae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            image_encoder=image_encoder,  # SDXL's optional IP-Adapter encoder: kept, not used
            feature_extractor=feature_extractor,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )
        self.register_to_config(force_zeros_for_empty_prompt=bool(force_zeros_for_empty_prompt))
        self.clip_model_name_or_path = clip_model_name_or_path or DEFAULT_CLIP
        self._family = family(self)

    @property
    def denoiser(self):
        """The denoiser: the ``unet`` of the noise-prediction families, the ``transformer`` of the flow-matching
        ones (`family.denoiser_name` names the component)."""
        unet = getattr(self, "unet", None)
        return unet if unet is not None else getattr(self, "transformer", None)

    @property
    def family(self) -> ModelFamily:
        """The model family (`families`): encode/decode, conditioning, the denoiser call and the step maths."""
        return self._family

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, clip_model_name_or_path: str | None = None, **kwargs):
        r"""Loads a pipeline folder written by `save_pretrained`, or a diffusers repository of one of four layouts.

        - a DDPM (`DDPMPipeline`: ``unet`` + ``scheduler``, e.g. ``google/ddpm-celebahq-256``): pixel space;
        - an unconditional latent diffusion model (`LDMPipeline`: ``vqvae`` + ``unet`` + ``scheduler``, e.g.
          ``CompVis/ldm-celebahq-256``);
        - Stable Diffusion (`StableDiffusionPipeline`: ``vae``, ``text_encoder``, ``tokenizer``, ``unet``,
          ``scheduler``; the safety checker and feature extractor are not loaded), e.g.
          ``stable-diffusion-v1-5/stable-diffusion-v1-5`` or ``stabilityai/stable-diffusion-2-1-base``.

        - SDXL (`StableDiffusionXLPipeline`: also ``text_encoder_2`` and ``tokenizer_2``; the refiner is refused),
          e.g. ``stabilityai/stable-diffusion-xl-base-1.0``; SDXL-Turbo-style checkpoints with trailing timestep
          spacing get the trailing grid (`families.base.DDIMFamily.timesteps`).

        SD3, Flux and other pipelines raise `ValueError` before anything loads.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): Hub id or local folder.
            clip_model_name_or_path (`str`, *optional*): Where to load CLIP from when it is needed and was not
                passed as ``clip_model=``/``clip_tokenizer=`` (default ``"openai/clip-vit-base-patch16"``).
            **kwargs: Passed to [`~diffusers.DiffusionPipeline.from_pretrained`] (``clip_model=``, ``dtype=``, ...).
        """
        check_layout(pretrained_model_name_or_path, kwargs)
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        check_loaded(pipe)  # every weight present and finite, a valid noise schedule
        for component in (pipe.denoiser, pipe.vae, pipe.vqvae):
            if component is not None:
                _align_tensors(component)
        if clip_model_name_or_path is not None:
            pipe.clip_model_name_or_path = clip_model_name_or_path
        adapters = os.path.join(os.fspath(pretrained_model_name_or_path), lora_file.ADAPTERS_FOLDER)
        if os.path.isfile(
            os.path.join(adapters, lora_file.INDEX_NAME)
        ):  # written next to the base UNet by save_pretrained
            lora_file.load_adapters_folder(pipe.denoiser, adapters)
        return pipe

    @holds_unet_lock
    def save_pretrained(self, save_directory, **kwargs):
        """Saves the pipeline atomically: a reader sees the old complete folder or the new one, never a mix.

        The UNet is saved as its base weights (a plain `UNet2DModel` folder), its adapters as their own files,
        ``save_directory/lora/<name>/pytorch_lora_weights.safetensors``, with an index ``lora/adapters.json`` of the
        active set, weights and enabled flag, which `from_pretrained` of that folder restores. (diffusers alone would
        write peft's wrapped layers, which `UNet2DModel.from_pretrained` silently re-initialises.)
        """
        adapted, name = self.denoiser, self.family.denoiser_name
        with atomic_directory(save_directory) as tmp:
            self.register_modules(**{name: plain_unet(adapted)})  # shares the tensors, no copy
            try:
                super().save_pretrained(tmp, **kwargs)
            finally:
                self.register_modules(**{name: adapted})
            if lora_state.adapter_names(adapted):
                lora_file.save_adapters_folder(adapted, os.path.join(tmp, lora_file.ADAPTERS_FOLDER))

    def progress_bar(self, iterable=None, total=None, desc: str | None = None):
        """diffusers' progress bar, labelled ``desc`` (after the configured ``desc``, if any). Where the bars are set
        to show on a terminal only (``set_progress_bar_config(disable=None)``, as the CLI and the demo do) and stderr
        is not one (a log file, a CI job), progress is written as a line per 10 % instead (`LogProgress`)."""
        config = dict(getattr(self, "_progress_bar_config", None) or {})
        label = ": ".join(part for part in (config.get("desc"), desc) if part) or None
        if "disable" in config and config["disable"] is None and not sys.stderr.isatty():
            return LogProgress(iterable, total=total, desc=label)
        previous = getattr(self, "_progress_bar_config", None)
        self._progress_bar_config = {**config, "desc": label} if label else config
        try:
            return super().progress_bar(iterable, total)
        finally:
            if previous is None:
                del self._progress_bar_config
            else:
                self._progress_bar_config = previous

    # ---- the family seam (`families`): images <-> the denoiser's space, conditioning, the denoiser call -------

    def noise_to(self, x0: torch.Tensor, t0: int, generator=None) -> torch.Tensor:
        """The forward process q(x_t0 | x0) in closed form (``encoding="noise"``), noise from ``generator``."""
        return self.family.noise_to(x0, t0, generator)

    @property
    def autoencoder(self):
        """The latent model's autoencoder (``vae`` or ``vqvae``), `None` for a pixel-space UNet."""
        return self.family.autoencoder

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (1 for a pixel-space UNet, 8 for Stable Diffusion)."""
        return self.family.vae_scale_factor

    @property
    def resolution(self) -> int:
        """The side of the square images the pipeline works at: inputs are centre-cropped and resized to it."""
        return self.family.sample_size * self.family.vae_scale_factor

    @property
    def image_channels(self) -> int:
        return self.family.image_channels

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """UNet-space latents of images in [-1, 1] (the images themselves for a pixel-space UNet)."""
        return self.family.encode(image)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (not clamped) from UNet-space latents; differentiable (fine-tuning decodes x0_hat)."""
        return self.family.decode(latents)

    def encode_prompt(self, prompt: str | list[str] | None, batch_size: int = 1, **conditioning):
        """What the UNet is conditioned on for ``prompt`` (``None`` means the empty prompt; a list holds one prompt
        per sample), for ``batch_size`` samples (for Stable Diffusion, the text encoder's hidden states; for SDXL a
        dict with the pooled embeddings and the size conditioning, which ``conditioning`` may set: ``original_size``,
        ``crops_coords_top_left``, ``target_size``); `None` for an unconditional UNet (where a non-empty ``prompt``
        is an error)."""
        if not isinstance(prompt, (list, tuple)):
            return self.family.encode_prompt(prompt, batch_size, **conditioning)
        if len(prompt) != batch_size:
            raise ValueError(f"`prompt` is a list of {len(prompt)} prompts for {batch_size} images: pass one each.")
        return _concat_conditions([self.family.encode_prompt(p, 1, **conditioning) for p in prompt])

    def _predict_noise(self, sample: torch.Tensor, timestep: int, adapted: bool = True, condition=None):
        """The UNet's prediction at integer ``timestep`` (``condition`` from `encode_prompt`); ``adapted=False`` asks
        for the original model."""
        if adapted:
            return self.family.predict(self.denoiser, sample, timestep, condition)
        with self._original_model():
            return self.family.predict(self.denoiser, sample, timestep, condition)

    def _step_callback(self, callback, names, i, t, tensors: dict) -> tuple[torch.Tensor, object]:
        """Runs ``callback(self, i, t, callback_kwargs)`` with the requested tensors (``prompt_embeds``: the
        conditional text embeddings); returns the latents and the conditioning, as the callback left them."""
        condition = tensors.pop("condition")
        embeds = condition["encoder_hidden_states"] if isinstance(condition, dict) else condition
        available = {**tensors, "prompt_embeds": embeds}
        outputs = callback(self, i, int(t), {name: available[name] for name in names}) or {}
        latents = outputs.get("latents", tensors["latents"])
        new_embeds = outputs.get("prompt_embeds", embeds)
        if new_embeds is not embeds:  # diffusers' CFG-cutoff callbacks keep the conditional half, batch 1
            new_embeds = new_embeds.expand(latents.shape[0], *new_embeds.shape[1:])
            condition = (
                {**condition, "encoder_hidden_states": new_embeds} if isinstance(condition, dict) else new_embeds
            )
        return latents, condition

    def _likely_causes(self, edit_strength: float, eta: float, adapters) -> str:
        """What can make an edit non-finite, with this call's values (for `NonFiniteResultError`)."""
        weights = adapters if adapters is not None else lora_state.adapter_weights(self.denoiser)
        return (
            f"`edit_strength`={edit_strength:g}, `eta`={eta:g}, the adapters' weights {dict(weights)!r:.200}, the "
            "given `latents`, or an adapter's own weights (far too large after a diverged fine-tuning)"
        )

    def _original_model(self):
        """Context in which the UNet is the original model (every adapter bypassed); refused while adapters are
        fused into its weights (`fuse_lora`)."""
        if self.fused_loras:
            raise ValueError(
                f"The adapters {sorted(self.fused_loras)} are fused into the UNet, so the original model (for the "
                "inversion, or an edit strength below 1) is not available: call `unfuse_lora()` first."
            )
        return lora_state.adapters_disabled(self.denoiser)

    def _mixed_noise(self, sample, timestep, mix: list[MixComponent] | None, condition=None) -> torch.Tensor:
        """``sum_i m_i w_i(t) eps_i + (1 - sum_i m_i w_i(t)) eps_original`` (see `mixing`); skips zero weights."""
        if mix is None:
            return self._predict_noise(sample, timestep, adapted=True, condition=condition)
        t = int(timestep)
        noise_pred, total = torch.zeros_like(sample), 0.0
        for component in mix:
            weight = check_number(component.weight(t), f"adapter weight at t={t}")
            if weight == 0:
                continue
            names = component.adapter_names
            context = contextlib.nullcontext() if names is None else lora_state.using_adapters(self.denoiser, names)
            with context:
                eps = self._predict_noise(sample, t, adapted=True, condition=condition)
            m = weight if component.mask is None else weight * component.mask.to(sample)
            noise_pred = noise_pred + m * eps
            total = total + m
        if not torch.is_tensor(total) and total == 1.0:
            return noise_pred  # the original model has weight 0 (the paper's multi-attribute case)
        return noise_pred + (1.0 - total) * self._predict_noise(sample, t, adapted=False, condition=condition)

    # ---- validation ------------------------------------------------------------------------------------------

    @property
    def num_train_timesteps(self) -> int:
        return self.family.num_train_timesteps

    # ---- inversion -------------------------------------------------------------------------------------------

    @holds_unet_lock
    @torch.no_grad()
    def invert(
        self,
        image,
        t0: int = 500,
        num_inversion_steps: int = 40,
        num_fixed_point_iterations: int = 0,
        return_dict: bool = True,
        prompt: str | None = None,
        encoding: str = "ddim",
        inversion_start: str = "clean",
        generator: torch.Generator | list[torch.Generator] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        timesteps: list[int] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> DiffusionCLIPInversionOutput | tuple:
        r"""
        Deterministic DDIM inversion (the DDIM ODE run forward, eta = 0) of ``image`` from t = 0 to ``t0``.

        Runs `DDIMInverseScheduler` steps (extended to explicit grids, see `schedule.GridDDIMInverseScheduler`)
        over DiffusionCLIP's grid ``int(linspace(0, 1, num_inversion_steps) * t0)``, with the original (adapter-free)
        UNet evaluated at the *source* (lower) timestep of each step, as DiffusionCLIP does.

        That step is only approximately the inverse of the generation step (which evaluates the UNet at the upper
        timestep), and with a small or imperfect model the error adds up: an image regenerated from ``x_t0`` can
        come back in another colour or shape. ``num_fixed_point_iterations = k > 0`` refines each step's result
        ``x_t`` by ``k`` fixed-point iterations ``x_t <- step(eps(x_t, t), x_s)`` (fixed-point inversion, Pan et al.,
        arXiv 2309.04907; ReNoise, Garibi et al., arXiv 2403.14602), so that each step converges to the exact
        inverse of the DDIM generation step at the same grid points; regenerating with ``num_inference_steps ==
        num_inversion_steps`` then returns the input up to the iterations' residual. Each iteration costs one more
        UNet call per step.

        Args:
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                Images to invert: PIL (any mode), numpy HWC/NHWC uint8 or float in [0, 1], or torch CHW/NCHW in
                [0, 1] as diffusers reads tensors (a tensor with negative values is read in [-1, 1], 0.1's
                convention, with a `FutureWarning`; see `image_processing`). Other sizes are centre-cropped to a
                square and resized to `resolution` (the UNet's ``sample_size`` times the autoencoder's
                `vae_scale_factor`).
            t0 (`int`, *optional*, defaults to 500): The timestep to invert to, in [1, T - 1].
            num_inversion_steps (`int`, *optional*, defaults to 40): Steps (UNet evaluations) from 0 to ``t0``.
            num_fixed_point_iterations (`int`, *optional*, defaults to 0): Refinements of every step (see above);
                0 is DiffusionCLIP's inversion.
            return_dict (`bool`, *optional*, defaults to `True`): Return a dataclass instead of a tuple.
            prompt (`str`, *optional*): For a text-conditioned UNet (Stable Diffusion), the prompt it is conditioned
                on while inverting; the empty prompt by default. Invert and regenerate with the same prompt.
            encoding (`str`, *optional*, defaults to `"ddim"`): ``"ddim"`` is the deterministic inversion above;
                ``"noise"`` is EffDiff's fast encoding (Starodubcev et al., arXiv 2304.04344): the closed-form forward
                noise ``x_t0 = sqrt(a_t0) x0 + sqrt(1 - a_t0) eps`` with ``eps`` drawn from ``generator`` — no UNet
                call, stochastic (the regeneration does not return the input), seeded by ``generator``.
            inversion_start (`str`, *optional*, defaults to `"clean"`): Where the DDIM inversion starts. ``"clean"``
                (ours): the first step goes from the clean image (alpha = 1) to the grid's first point t = 0 with
                ``eps(x0, 0)``, then on; ``num_inversion_steps`` UNet calls. ``"official"``: as the official
                DiffusionCLIP code, the clean image is taken as ``x`` at t = 0 (``alphas_cumprod[0]``) and the first
                step is skipped: ``num_inversion_steps - 1`` calls, latents reproducible against that code.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): The noise of ``encoding="noise"``.
            original_size, crops_coords_top_left, target_size (`tuple[int, int]`, *optional*): SDXL's size
                conditioning, as `StableDiffusionXLPipeline` takes it (defaults: the working resolution, no crop).
            timesteps (`list[int]`, *optional*): A custom grid instead of the one ``t0`` and
                ``num_inversion_steps`` build (as diffusers' ``timesteps`` replaces ``num_inference_steps``): distinct
                integer timesteps in either order; the inversion ends at the highest, which is the depth ``t0``
                (``t0`` and ``num_inversion_steps`` are then not used). A flow model's grid holds no 0 (the clean
                image lies below it). Regenerate with the same ``timesteps`` for a round trip.
            prompt_embeds (`torch.Tensor`, *optional*), pooled_prompt_embeds (`torch.Tensor`, *optional*):
                Precomputed conditioning instead of ``prompt``, as the family's stock pipeline's `encode_prompt`
                returns it: ``(batch, tokens, dim)`` hidden states and, for SDXL / SD3 / Flux, the ``(batch, dim)``
                pooled embeddings; batch 1 or one per image. SDXL's time ids still come from the size arguments.

        Returns:
            [`DiffusionCLIPInversionOutput`] or `tuple`: ``(x_t0, timesteps, image)``; ``x_t0`` is in the UNet's
            (latent) space, ``image`` the preprocessed input in pixels (the decoded input when ``image`` held
            latents, see `image_latents`).
        """
        # 1. Check inputs
        self.check_inputs(
            image, t0, num_inversion_steps, generator=generator, num_fixed_point_iterations=num_fixed_point_iterations,
            timesteps=timesteps, prompt=prompt, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
        )  # fmt: skip
        check_choice(encoding, "encoding", ENCODINGS)
        check_choice(inversion_start, "inversion_start", self.family.inversion_starts)
        size = {
            "original_size": original_size,
            "crops_coords_top_left": crops_coords_top_left,
            "target_size": target_size,
        }
        batch_size = batch_size_of(image, None)
        condition = self.prepare_condition(prompt, prompt_embeds, pooled_prompt_embeds, batch_size, **size)
        latents, timesteps, x0 = self._invert(
            image, t0, num_inversion_steps, num_fixed_point_iterations, prompt, encoding, inversion_start, generator,
            condition=condition, timesteps=timesteps,
        )  # fmt: skip
        if x0 is None:  # `image` held latents: the decoded input
            x0 = self.decode_latents(self.image_latents(image).to(latents)).clamp(-1, 1)
        if not return_dict:
            return (latents, timesteps, x0)
        return DiffusionCLIPInversionOutput(x_t0=latents, timesteps=timesteps, image=x0)

    def _invert(
        self,
        image,
        t0,
        num_inversion_steps,
        num_fixed_point_iterations,
        prompt,
        encoding,
        inversion_start,
        generator,
        condition=None,
        timesteps=None,
    ) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
        """`invert` on checked arguments (`invert` and `edit` check them once, at their entry); ``condition``, when
        the caller encoded ``prompt`` already, is used as it is. The returned image is `None` when ``image`` held
        latents (`image_latents`)."""  # fmt: skip
        # 2. Preprocess image to [-1, 1] and encode it (or take the latents given as `image`)
        given = self.image_latents(image)
        x0 = self.prepare_image(image) if given is None else None
        if given is None:
            latents = self.encode_image(x0)
        else:
            latents = given.to(device=self._execution_device, dtype=self.denoiser.dtype)
        if encoding == "noise":  # EffDiff: closed-form forward noising, no UNet call
            top = int(t0) if timesteps is None else self.custom_grid(timesteps)[-1]
            return self.noise_to(latents, top, generator), [top], x0
        if condition is None:
            condition = self.encode_prompt(prompt, latents.shape[0])
        # 3. Inversion grid [0, ..., t0] (or the caller's `timesteps`) on the family's inverse scheduler
        timesteps = self.grid(t0, num_inversion_steps, timesteps)
        inverse_scheduler = self.family.inversion_scheduler(timesteps)
        # "official": the clean image is x at t = 0, so the first step (alpha 1 -> alphas_cumprod[0]) is skipped
        steps = inverse_scheduler.timesteps[1:] if inversion_start == "official" else inverse_scheduler.timesteps
        # 4. DDIM eq. (12) run forward from the image's latents, eps of the original model at the source level
        with self._original_model():  # once for the loop, not per call
            for t in self.progress_bar(steps, desc="inversion"):
                source_t = max(inverse_scheduler.source_timestep(t), 0)
                noise_pred = self._predict_noise(latents, source_t, condition=condition)
                next_latents = inverse_scheduler.step(noise_pred, t, latents).prev_sample
                # fixed-point refinement (k > 0): eps at the target level, as the generation step evaluates it
                for _ in range(num_fixed_point_iterations):
                    noise_pred = self._predict_noise(next_latents, t, condition=condition)
                    next_latents = inverse_scheduler.step(noise_pred, t, latents).prev_sample
                latents = next_latents
        _check_finite_result(latents, "The inversion", "the original UNet's weights, or the input image")
        return latents, timesteps, x0

    # ---- editing ---------------------------------------------------------------------------------------------

    @holds_unet_lock
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image=None,
        t0: int = 500,
        num_inversion_steps: int = 40,
        num_inference_steps: int = 40,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        edit_strength: float = 1.0,
        adapters: Mapping[str, float | Callable[[int], float]] | None = None,
        adapter_masks: Mapping[str, torch.Tensor] | None = None,
        num_fixed_point_iterations: int = 0,
        prompt: str | None = None,
        guidance_scale: float = 1.0,
        encoding: str = "ddim",
        inversion_start: str = "clean",
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        num_images_per_prompt: int = 1,
        negative_prompt: str | list[str] | None = None,
        cross_attention_kwargs: dict | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> DiffusionCLIPPipelineOutput | tuple:
        r"""
        Edits ``image`` (the same as `edit`): DDIM-invert it to ``t0`` with the original UNet, then regenerate it with
        the current (fine-tuned) UNet over ``num_inference_steps`` DDIM steps from ``t0`` to 0.

        Args:
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*):
                Images to edit (see `invert` for the accepted forms). Not needed when ``latents`` is given.
            t0 (`int`, *optional*, defaults to 500): Inversion depth; larger edits more and keeps less. It need not
                be the adapter's fine-tuning ``t0`` (the test-bed edits from 400 with adapters fine-tuned from 500).
            num_inversion_steps (`int`, *optional*, defaults to 40): Inversion steps (ignored with ``latents``).
            num_inference_steps (`int`, *optional*, defaults to 40): Generation steps from ``t0`` to 0.
            eta (`float`, *optional*, defaults to 0.0): DDIM eta; 0 is deterministic, > 0 adds noise.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): For ``eta > 0``; a list must
                hold one generator per image.
            latents (`torch.Tensor`, *optional*): Precomputed ``x_t0`` (e.g. `invert(...).x_t0`, same ``t0``).
            output_type (`str`, *optional*, defaults to `"pil"`): ``"pil"``, ``"np"`` or ``"pt"`` (both in [0, 1]),
                or ``"latent"``: the generated latents, not decoded (the images themselves for a pixel model).
            return_dict (`bool`, *optional*, defaults to `True`): Return a dataclass instead of a tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                ``fn(pipe, step, timestep, callback_kwargs)`` called after every generation step; it may return a dict
                to replace ``latents`` or ``prompt_embeds``, set ``pipe._guidance_scale`` (diffusers' CFG-cutoff
                callbacks do) or ``pipe._interrupt`` (the remaining steps are skipped).
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to ``["latents"]``): Tensors put
                in ``callback_kwargs``: any of `_callback_tensor_inputs` (``"latents"``, ``"pred_original_sample"``,
                ``"prompt_embeds"``); a `PipelineCallback` names its own.
            edit_strength (`float`, *optional*, defaults to 1.0): Continuous edit strength r (paper Sec. 3.4):
                ``eps = r * eps_adapted + (1 - r) * eps_original`` at every step (two UNet calls per step when r is
                not 1). 0 gives the reconstruction, 1 the full edit; values outside [0, 1] extrapolate, with a
                warning. The cheap approximation is scaling the LoRA weights: ``set_adapters(name, r)`` (one call per
                step). Not diffusers' img2img ``strength``: that is the noising depth, which here is ``t0``
                (``t0 ~ strength * num_train_timesteps``). ``strength=`` is still accepted as the old name of this
                argument, with a `FutureWarning`.
            adapters (`dict[str, float | Callable[[int], float]]`, *optional*): Multi-attribute editing (paper Sec.
                3.4): ``eps = sum_i m_i g_i(t) eps_i + (1 - sum_i m_i g_i(t)) eps_original``, each loaded adapter's
                weight ``g_i`` a number or a function of the timestep (see `mixing.piecewise_weights`).
            adapter_masks (`dict[str, torch.Tensor]`, *optional*): Spatial masks ``m_i`` in [0, 1], (H, W) or
                (B, 1, H, W), for local edits; outside a mask the original model's prediction is kept.
            num_fixed_point_iterations (`int`, *optional*, defaults to 0): Fixed-point refinements of every
                inversion step (see `invert`; ignored with ``latents``). With ``num_inference_steps ==
                num_inversion_steps`` they make the unedited regeneration match the input.
            prompt (`str` or `list[str]`, *optional*): For a text-conditioned UNet (Stable Diffusion), the prompt
                it is conditioned on while inverting and regenerating (the empty prompt by default; the adapter's
                source prompt is the other natural choice); a list holds one prompt per image. Encoded once.
            guidance_scale (`float`, *optional*, defaults to 1.0): Classifier-free guidance for the *generation*
                only: ``eps = eps("") + g * (eps(prompt) - eps(""))``. 1 means none, the default: the DDIM round trip
                is exact only without guidance, because the inversion follows the unguided ODE; with ``g > 1`` the
                regeneration drifts from the input (null-text-style inversion, which would repair that, is not
                part of this package). Needs a text-conditioned UNet and a non-empty ``prompt``.
            encoding (`str`, *optional*, defaults to `"ddim"`), inversion_start (`str`, *optional*, defaults to
                `"clean"`): How ``image`` is brought to ``t0`` (see `invert`): ``encoding="noise"`` is EffDiff's
                zero-call stochastic encoding, seeded by ``generator``.
            original_size, crops_coords_top_left, target_size (`tuple[int, int]`, *optional*): SDXL's size
                conditioning (see `invert`).
            num_images_per_prompt (`int`, *optional*, defaults to 1): Edits of every image; they differ only where
                the edit is stochastic (``encoding="noise"``, or ``eta > 0``), so more than one is refused otherwise.
            negative_prompt (`str` or `list[str]`, *optional*): The unconditional side of classifier-free guidance
                (needs ``guidance_scale > 1``; by default the family's: the empty prompt, or zeros for SDXL).
            cross_attention_kwargs (`dict`, *optional*): ``{"scale": s}`` scales every active adapter's LoRA delta
                during the generation, as diffusers' pipelines do (0: the reconstruction); the same as
                ``set_adapters(names, s * weights)`` for the call. diffusers' other names for this argument,
                ``attention_kwargs`` (Flux) and ``joint_attention_kwargs`` (SD3), are accepted. Other keys are
                refused: the denoiser calls here take no attention arguments.
            timesteps (`list[int]`, *optional*): A custom grid shared by the inversion and the generation, instead of
                the ones ``t0``, ``num_inversion_steps`` and ``num_inference_steps`` build (as diffusers' ``timesteps``
                replaces ``num_inference_steps``; here those three are then not used): distinct integer timesteps in
                either order, the highest being the depth ``t0``; ``latents`` must be at that depth. Few-step
                checkpoints distilled on a fixed grid (e.g. ``[999, 749, 499, 249]``) want theirs.
            sigmas (`list[float]`, *optional*): Refused with an explanation: the grid is integer timesteps, which a
                flow model's scheduler maps to sigmas through its shift; pass ``timesteps``.
            prompt_embeds, pooled_prompt_embeds (`torch.Tensor`, *optional*): Precomputed conditioning instead of
                ``prompt`` (see `invert`), used while inverting and regenerating.
            negative_prompt_embeds, negative_pooled_prompt_embeds (`torch.Tensor`, *optional*): Precomputed
                ``negative_prompt`` (needs ``guidance_scale`` > 1).
            image: besides images, a latent family takes the autoencoder's latents as ``image`` (see
                `image_latents`): they are inverted as they are, without encoding.

        Examples:

        Returns:
            [`DiffusionCLIPPipelineOutput`] or `tuple`: ``(images, x_t0, timesteps)``.
        """
        # 1. Check inputs
        lora_scale = _lora_scale(cross_attention_kwargs, kwargs)
        edit_strength = _renamed_kwargs(kwargs, edit_strength)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(
            image, t0, num_inversion_steps, num_inference_steps, eta, generator, latents, output_type,
            callback_on_step_end_tensor_inputs, num_fixed_point_iterations, timesteps, sigmas, prompt, prompt_embeds,
            pooled_prompt_embeds, negative_prompt, negative_prompt_embeds, negative_pooled_prompt_embeds,
        )  # fmt: skip
        check_choice(encoding, "encoding", ENCODINGS)
        check_choice(inversion_start, "inversion_start", self.family.inversion_starts)
        image, latents = self._repeat_inputs(image, latents, num_images_per_prompt, encoding, eta)
        batch_size = batch_size_of(image, latents)
        prompt = [p for p in prompt for _ in range(num_images_per_prompt)] if isinstance(prompt, list) else prompt
        guidance_scale = self._check_guidance(
            guidance_scale, prompt, negative_prompt, lora_scale, (prompt_embeds, negative_prompt_embeds)
        )
        mix = build_mix(
            edit_strength, adapters, adapter_masks, self.lora_adapters, batch_size, self.family.sample_size
        )
        if not 0.0 <= edit_strength <= 1.0:
            warnings.warn(f"`edit_strength`={edit_strength} is outside [0, 1]: extrapolating the edit.", stacklevel=4)
        if adapters is None and edit_strength != 0 and not lora_state.adapters_enabled(self.denoiser):
            warnings.warn(
                "No adapter is active: `edit` only reconstructs its input. Fine-tune one (`finetune`) or load one "
                "(`load_lora_weights`) first.",
                NoAdapterWarning,
                stacklevel=4,
            )
        # 2. Encode the prompt once; invert to x_t0 with the original model (or take the given latents)
        size = {
            "original_size": original_size,
            "crops_coords_top_left": crops_coords_top_left,
            "target_size": target_size,
        }
        condition = self.prepare_condition(prompt, prompt_embeds, pooled_prompt_embeds, batch_size, **size)
        unconditional = None
        if guidance_scale > 1:  # the family's unconditional input unless a negative prompt is given
            if negative_prompt is None and negative_prompt_embeds is None:
                unconditional = self.family.encode_negative(batch_size)
            else:
                negative = (negative_prompt, negative_prompt_embeds, negative_pooled_prompt_embeds)
                unconditional = self.prepare_condition(*negative, batch_size, "negative_prompt", **size)
        if latents is None:
            inversion = (num_inversion_steps, num_fixed_point_iterations, prompt, encoding, inversion_start)
            latents, _, _ = self._invert(image, t0, *inversion, generator, condition=condition, timesteps=timesteps)
        latents = latents.to(device=self._execution_device, dtype=self.denoiser.dtype)
        x_t0 = latents
        # 3. Generation grid [t0, ..., 0] (or the caller's `timesteps`) on the family's scheduler
        scheduler = self.family.generation_scheduler(self.grid(t0, num_inference_steps, timesteps))
        self._guidance_scale, self._interrupt, self._num_timesteps = guidance_scale, False, len(scheduler.timesteps)
        # 4. Denoising loop with the current (adapted) UNet, or the mix of original and adapted predictions
        with lora_state.lora_scaled(self.denoiser, lora_scale):  # cross_attention_kwargs={"scale": ...}
            for i, t in enumerate(self.progress_bar(scheduler.timesteps, desc="generation")):
                if self.interrupt:
                    continue
                noise_pred = self._mixed_noise(latents, t, mix, condition)
                if unconditional is not None and self._guidance_scale > 1:  # CFG (generation only, lossy: docstring)
                    noise_uncond = self._mixed_noise(latents, t, mix, unconditional)
                    noise_pred = noise_uncond + self._guidance_scale * (noise_pred - noise_uncond)
                step = scheduler.step(noise_pred, t, latents, eta=eta, generator=generator)
                latents = step.prev_sample
                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "pred_original_sample": step.pred_original_sample}
                    latents, condition = self._step_callback(
                        callback_on_step_end, callback_on_step_end_tensor_inputs, i, t,
                        {**tensors, "condition": condition},
                    )  # fmt: skip
        # 5. Post-process (a non-finite result is an error, never an image)
        _check_finite_result(latents, "The edit", self._likely_causes(edit_strength, eta, adapters))
        if output_type == "latent":  # the denoiser's space, for a later decode or another pipeline
            images = latents
        else:
            decoded = self.decode_latents(latents)
            _check_finite_result(decoded, "The decoded edit", "the autoencoder overflowed (fp16 VAE: decode in fp32)")
            images = postprocess_image(decoded, output_type)
        self.maybe_free_model_hooks()
        generation_grid = [int(t) for t in scheduler.timesteps]
        if not return_dict:
            return (images, x_t0, generation_grid)
        return DiffusionCLIPPipelineOutput(images=images, x_t0=x_t0, timesteps=generation_grid)

    edit = __call__  # the paper's name for the call; the same function, with the same signature

    # ---- fine-tuning and adapters ----------------------------------------------------------------------------

    @holds_unet_lock
    def finetune(
        self, prompt_src: str, prompt_tar: str, images=None, config: FinetuneConfig | None = None, **kwargs
    ) -> FinetuneOutput:
        r"""
        Fine-tunes a LoRA adapter of the UNet so that editing moves images from ``prompt_src`` to ``prompt_tar``
        (DiffusionCLIP, arXiv 2110.02711, Sec. 3.2: directional CLIP loss + L1 identity term, on precomputed latents).
        A forwarder to [`~training.finetune`], which documents every argument; training is imported only when this
        runs, so that inference never loads it.

        Args:
            prompt_src (`str`): Text describing the source domain, e.g. ``"face"``.
            prompt_tar (`str`): Text describing the target, e.g. ``"smiling face"``.
            images (*optional*): Training images (any form `invert` accepts). `None` samples
                ``config.num_sampled_images`` images from the model itself (seeded DDIM).
            config ([`FinetuneConfig`], *optional*): Settings; single fields can also be given as keyword arguments
                (``pipe.finetune(src, tar, num_epochs=5, lora_rank=8)``).
            **kwargs: `FinetuneConfig` fields, and the options of [`~training.finetune`]: ``adapter_name`` (default
                ``"default"``; a failed or interrupted run discards it and restores the adapters as they were),
                ``identity_loss``, ``source_images`` / ``target_images`` (an image-guided direction), ``cache_dir``
                (cached latents), ``checkpoint_dir`` / ``checkpoint_every`` / ``resume_from`` (resumable, bit for
                bit), ``loss_vae`` (e.g. TAESD, decoding ``x0_hat`` for the loss only), ``validation_images`` /
                ``validation_epochs`` / ``keep_best`` / ``keep_best_min_ssim`` / ``report_to`` / ``logging_dir``
                (held-out validation, best-epoch selection, trackers), ``early_stopping_patience`` /
                ``early_stopping_threshold`` / ``early_stopping_metric`` / ``early_stopping_on`` (stop when the
                held-out score, or the training images' proxy, plateaus; the best epoch is kept and
                ``FinetuneOutput.stop_reason`` says why), ``callback_on_epoch_end`` (a truthy return stops) and
                ``accelerator``.

        Returns:
            [`FinetuneOutput`]: the adapter name and the loss of every optimizer step.
        """
        from .training import FinetuneConfig, finetune  # training: imported only when it runs

        options = inspect.signature(finetune).parameters
        forwarded = {name: kwargs.pop(name) for name in list(kwargs) if name in options}
        if config is None:  # the family's LoRA targets unless the caller names them (a transformer has no conv1)
            kwargs.setdefault("lora_target_modules", self.family.default_lora_target_modules)
        config = FinetuneConfig.from_kwargs(config, **kwargs)
        return finetune(self, prompt_src, prompt_tar, images=images, config=config, **forwarded)

"""`DiffusionCLIPPipeline`: text-driven editing of real images (Kim, Kwon, Ye, CVPR 2022, arXiv 2110.02711)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.utils import logging

from .image_processing import postprocess_image, preprocess_image
from .pipeline_output import DiffusionCLIPInversionOutput, DiffusionCLIPPipelineOutput
from .schedule import GridDDIMInverseScheduler, GridDDIMScheduler, ddim_timesteps

logger = logging.get_logger(__name__)

DEFAULT_CLIP = "openai/clip-vit-base-patch16"
OUTPUT_TYPES = ("pil", "np", "pt")

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


def _as_deterministic(scheduler, cls):
    """``cls`` built from ``scheduler``'s config with ``clip_sample=False`` (clipping x0 breaks DDIM inversion)."""
    if type(scheduler) is cls and not scheduler.config.clip_sample:
        return scheduler
    if scheduler.config.get("clip_sample", False):
        logger.info(f"Building {cls.__name__} with clip_sample=False from the {type(scheduler).__name__} config.")
    return cls.from_config(scheduler.config, clip_sample=False)


class DiffusionCLIPPipeline(DiffusionPipeline):
    r"""
    Pipeline for DiffusionCLIP: DDIM-invert real images to a middle timestep ``t0`` and regenerate them with a UNet
    fine-tuned (here with LoRA) by a directional CLIP loss (Kim, Kwon, Ye, CVPR 2022, arXiv 2110.02711).

    With an unmodified UNet, `edit` reconstructs its input (the paper's "reconstruction" mode).

    Args:
        unet ([`UNet2DModel`]): A pixel-space, unconditional noise-prediction UNet (e.g. `google/ddpm-celebahq-256`).
        scheduler ([`DDIMScheduler`]): Generation scheduler. Any scheduler is converted to a `DDIMScheduler` from
            its config, with ``clip_sample=False``.
        inverse_scheduler ([`DDIMInverseScheduler`], *optional*): Inversion scheduler; built from the scheduler's
            config (``clip_sample=False``) when not given.
        clip_model ([`~transformers.CLIPModel`], *optional*): CLIP for the directional loss; loaded lazily from
            `clip_model_name_or_path` (default ``"openai/clip-vit-base-patch16"``) when fine-tuning needs it.
        clip_tokenizer ([`~transformers.CLIPTokenizer`], *optional*): CLIP's tokenizer.
        vae (*optional*): Reserved for latent models (encode/decode seam); must be `None` for now.
    """

    model_cpu_offload_seq = "unet"
    _optional_components = ["inverse_scheduler", "clip_model", "clip_tokenizer", "vae"]

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: DDIMScheduler,
        inverse_scheduler: DDIMInverseScheduler | None = None,
        clip_model=None,
        clip_tokenizer=None,
        vae=None,
    ):
        super().__init__()
        if vae is not None:
            raise NotImplementedError("Latent (VAE) models are not supported yet: pass `vae=None`.")
        scheduler = _as_deterministic(scheduler, DDIMScheduler)
        inverse_scheduler = _as_deterministic(inverse_scheduler or scheduler, DDIMInverseScheduler)
        self.register_modules(
            unet=unet,
            scheduler=scheduler,
            inverse_scheduler=inverse_scheduler,
            clip_model=clip_model,
            clip_tokenizer=clip_tokenizer,
            vae=vae,
        )
        self.clip_model_name_or_path = DEFAULT_CLIP

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, clip_model_name_or_path: str | None = None, **kwargs):
        r"""Loads a pipeline folder written by `save_pretrained`, or a plain DDPM repository (``unet`` + scheduler).

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): Hub id or local folder.
            clip_model_name_or_path (`str`, *optional*): Where to load CLIP from when it is needed and was not
                passed as ``clip_model=``/``clip_tokenizer=`` (default ``"openai/clip-vit-base-patch16"``).
            **kwargs: Passed to [`~diffusers.DiffusionPipeline.from_pretrained`] (``clip_model=``, ``dtype=``, ...).
        """
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if clip_model_name_or_path is not None:
            pipe.clip_model_name_or_path = clip_model_name_or_path
        return pipe

    # ---- CLIP --------------------------------------------------------------------------------------------------

    def load_clip(self, clip_model_name_or_path: str | None = None, **kwargs) -> None:
        """Loads CLIP and its tokenizer (``clip_model_name_or_path`` or the pipeline's default) into the pipeline."""
        from transformers import CLIPModel, CLIPTokenizer

        name = clip_model_name_or_path or self.clip_model_name_or_path
        try:
            clip_model = CLIPModel.from_pretrained(name, **kwargs)
            clip_tokenizer = CLIPTokenizer.from_pretrained(name)
        except OSError as error:
            raise OSError(
                f"Could not load CLIP from {name!r} ({error}). Without internet access, pass a local CLIP: "
                "`DiffusionCLIPPipeline.from_pretrained(..., clip_model=CLIPModel.from_pretrained('/local/clip'), "
                "clip_tokenizer=CLIPTokenizer.from_pretrained('/local/clip'))`, or `pipe.load_clip('/local/clip')`, "
                "or `clip_model_name_or_path='/local/clip'`."
            ) from error
        self.register_modules(clip_model=clip_model.to(self._execution_device), clip_tokenizer=clip_tokenizer)

    def _require_clip(self) -> None:
        if self.clip_model is None or self.clip_tokenizer is None:
            self.load_clip()

    # ---- the encode/decode seam of latent models -------------------------------------------------------------

    def _encode(self, image: torch.Tensor) -> torch.Tensor:
        """Model-space representation of images in [-1, 1] (the images themselves for pixel-space UNets)."""
        return image

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from model-space latents (identity for pixel-space UNets)."""
        return latents

    # ---- noise prediction ------------------------------------------------------------------------------------

    def _predict_noise(self, sample: torch.Tensor, timestep: int, adapted: bool = True) -> torch.Tensor:
        """The UNet's noise prediction at integer ``timestep``; ``adapted=False`` asks for the original model."""
        t = torch.tensor(int(timestep), device=sample.device)
        if adapted:
            return self.unet(sample, t).sample
        from .lora import adapters_disabled

        with adapters_disabled(self.unet):
            return self.unet(sample, t).sample

    # ---- validation ------------------------------------------------------------------------------------------

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def check_inputs(
        self,
        image=None,
        t0=500,
        num_inversion_steps=40,
        num_inference_steps=40,
        eta=0.0,
        generator=None,
        latents=None,
        output_type="pil",
        callback_on_step_end_tensor_inputs=None,
    ) -> None:
        """Fails early, with the argument's name and value, on anything `invert`/`edit` cannot use."""
        T = self.num_train_timesteps
        if isinstance(t0, bool) or not isinstance(t0, (int, np.integer)) or not 1 <= t0 <= T - 1:
            raise ValueError(f"`t0` must be an integer in [1, {T - 1}], got {t0!r}.")
        for name, value in (
            ("num_inversion_steps", num_inversion_steps),
            ("num_inference_steps", num_inference_steps),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0:
            raise ValueError(f"`eta` must be a number >= 0, got {eta!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if image is None and latents is None:
            raise ValueError("Pass `image` (to invert) or `latents` (x_t0 from `invert`).")
        if image is not None:
            self._check_image(image)
        if latents is not None:
            c, s = self.unet.config.in_channels, self.unet.config.sample_size
            if not torch.is_tensor(latents) or latents.ndim != 4 or tuple(latents.shape[1:]) != (c, s, s):
                shape = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
                raise ValueError(f"`latents` must be a (batch, {c}, {s}, {s}) tensor, got {shape}.")
        if isinstance(generator, list):
            batch = self._batch_size(image, latents)
            if len(generator) != batch:
                raise ValueError(
                    f"`generator` is a list of {len(generator)} generators, but the batch size is {batch}."
                )
        if callback_on_step_end_tensor_inputs is not None:
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in ("latents", "pred_original_sample")]
            if unknown:
                raise ValueError(
                    "`callback_on_step_end_tensor_inputs` may hold 'latents' and 'pred_original_sample', "
                    f"got {unknown}."
                )

    def _check_image(self, image) -> None:
        if isinstance(image, (list, tuple)):
            if len(image) == 0:
                raise ValueError("`image` must not be an empty list.")
            shapes = {tuple(i.shape) for i in image if torch.is_tensor(i)}
            if len(shapes) > 1:
                raise ValueError(f"`image` is a list of tensors of mixed sizes {sorted(shapes)}; resize them first.")
            for item in image:
                self._check_image(item)
            return
        if not isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor)):
            raise TypeError(
                f"`image` must be a PIL image, a numpy array, a torch tensor or a list of them, got "
                f"{type(image).__name__}: {image!r:.100}."
            )

    @staticmethod
    def _batch_size(image, latents) -> int:
        if latents is not None:
            return latents.shape[0]
        if isinstance(image, (list, tuple)):
            return sum(DiffusionCLIPPipeline._batch_size(item, None) for item in image)
        if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
            return image.shape[0]
        return 1

    def _prepare_image(self, image) -> torch.Tensor:
        x0 = preprocess_image(image, self.unet.config.sample_size, self.unet.config.in_channels)
        return x0.to(device=self._execution_device, dtype=self.unet.dtype)

    # ---- inversion -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def invert(
        self, image, t0: int = 500, num_inversion_steps: int = 40, return_dict: bool = True
    ) -> DiffusionCLIPInversionOutput | tuple:
        r"""
        Deterministic DDIM inversion (the DDIM ODE run forward, eta = 0) of ``image`` from t = 0 to ``t0``.

        Runs `DDIMInverseScheduler` steps (extended to explicit grids, see `schedule.GridDDIMInverseScheduler`)
        over DiffusionCLIP's grid ``int(linspace(0, t0, num_inversion_steps))``, with the original (adapter-free)
        UNet evaluated at the *source* (lower) timestep of each step, as DiffusionCLIP does.

        Args:
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                Images to invert: PIL (any mode), numpy HWC/NHWC uint8 or float in [0, 1], or torch CHW/NCHW in
                [-1, 1]. Other sizes are centre-cropped to a square and resized to ``unet.config.sample_size``.
            t0 (`int`, *optional*, defaults to 500): The timestep to invert to, in [1, T - 1].
            num_inversion_steps (`int`, *optional*, defaults to 40): Steps (UNet evaluations) from 0 to ``t0``.
            return_dict (`bool`, *optional*, defaults to `True`): Return a dataclass instead of a tuple.

        Returns:
            [`DiffusionCLIPInversionOutput`] or `tuple`: ``(latents, timesteps, image)``.
        """
        # 1. Check inputs
        self.check_inputs(image, t0, num_inversion_steps)
        # 2. Preprocess image to [-1, 1] and into model space
        x0 = self._prepare_image(image)
        # 3. Inversion grid [0, ..., t0] on the inverse scheduler
        timesteps = ddim_timesteps(t0, num_inversion_steps, self.num_train_timesteps)
        inverse_scheduler = GridDDIMInverseScheduler.from_config(self.inverse_scheduler.config)
        inverse_scheduler.set_timesteps(timesteps=timesteps)
        # 4. DDIM eq. (12) run forward, eps of the original model at the source level
        latents = self._encode(x0)
        for t in self.progress_bar(inverse_scheduler.timesteps):
            source_t = max(inverse_scheduler.source_timestep(t), 0)
            noise_pred = self._predict_noise(latents, source_t, adapted=False)
            latents = inverse_scheduler.step(noise_pred, t, latents).prev_sample
        if not return_dict:
            return (latents, timesteps, x0)
        return DiffusionCLIPInversionOutput(latents=latents, timesteps=timesteps, image=x0)

    # ---- editing ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def edit(
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
    ) -> DiffusionCLIPPipelineOutput | tuple:
        r"""
        Edits ``image``: DDIM-invert it to ``t0`` with the original UNet, then regenerate it with the current
        (fine-tuned) UNet over ``num_inference_steps`` DDIM steps from ``t0`` to 0.

        Args:
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*):
                Images to edit (see `invert` for the accepted forms). Not needed when ``latents`` is given.
            t0 (`int`, *optional*, defaults to 500): Inversion depth; larger edits more and keeps less.
            num_inversion_steps (`int`, *optional*, defaults to 40): Inversion steps (ignored with ``latents``).
            num_inference_steps (`int`, *optional*, defaults to 40): Generation steps from ``t0`` to 0.
            eta (`float`, *optional*, defaults to 0.0): DDIM eta; 0 is deterministic, > 0 adds noise.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): For ``eta > 0``; a list must
                hold one generator per image.
            latents (`torch.Tensor`, *optional*): Precomputed ``x_t0`` (e.g. `invert(...).latents`, same ``t0``).
            output_type (`str`, *optional*, defaults to `"pil"`): ``"pil"``, ``"np"`` or ``"pt"`` (both in [0, 1]).
            return_dict (`bool`, *optional*, defaults to `True`): Return a dataclass instead of a tuple.
            callback_on_step_end (`Callable`, *optional*): ``fn(pipe, step, timestep, callback_kwargs)`` called after
                every generation step; it may return a dict to replace ``latents``.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to ``["latents"]``): Tensors put
                in ``callback_kwargs`` (``"latents"``, ``"pred_original_sample"``).

        Returns:
            [`DiffusionCLIPPipelineOutput`] or `tuple`: ``(images, latents, timesteps)``.
        """
        # 1. Check inputs
        self.check_inputs(
            image,
            t0,
            num_inversion_steps,
            num_inference_steps,
            eta,
            generator,
            latents,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        # 2. Invert to x_t0 with the original model (or take the given latents)
        if latents is None:
            latents = self.invert(image, t0=t0, num_inversion_steps=num_inversion_steps).latents
        latents = latents.to(device=self._execution_device, dtype=self.unet.dtype)
        x_t0 = latents
        # 3. Generation grid [t0, ..., 0] on the scheduler
        timesteps = ddim_timesteps(t0, num_inference_steps, self.num_train_timesteps)
        scheduler = GridDDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(timesteps=timesteps)
        # 4. Denoising loop with the current (adapted) UNet
        for i, t in enumerate(self.progress_bar(scheduler.timesteps)):
            noise_pred = self._predict_noise(latents, t, adapted=True)
            step = scheduler.step(noise_pred, t, latents, eta=eta, generator=generator)
            latents = step.prev_sample
            if callback_on_step_end is not None:
                callback_kwargs = {"latents": latents, "pred_original_sample": step.pred_original_sample}
                callback_kwargs = {k: callback_kwargs[k] for k in callback_on_step_end_tensor_inputs}
                callback_outputs = callback_on_step_end(self, i, int(t), callback_kwargs)
                if callback_outputs is not None:
                    latents = callback_outputs.get("latents", latents)
        # 5. Post-process
        images = postprocess_image(self._decode(latents), output_type)
        self.maybe_free_model_hooks()
        generation_grid = [int(t) for t in scheduler.timesteps]
        if not return_dict:
            return (images, x_t0, generation_grid)
        return DiffusionCLIPPipelineOutput(images=images, latents=x_t0, timesteps=generation_grid)

    def __call__(self, *args, **kwargs):
        """Same as `edit`."""
        return self.edit(*args, **kwargs)

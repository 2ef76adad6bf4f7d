"""What `DiffusionCLIPPipeline`'s `invert` and `edit` take, checked once at the public entry (`check_inputs`) and
brought into the form the step loops use: images (or their latents), the conditioning (from prompts or from
precomputed embeddings, diffusers' ``prompt_embeds``), the step grid (from ``t0`` and the step counts, or a custom
``timesteps`` list), repeated inputs and guidance."""

from __future__ import annotations

import torch

from .choices import OUTPUT_TYPES
from .image_processing import PreparedImages, preprocess_image
from .pipeline_utils import batch_size_of, check_image
from .scheduling_ddim_grid import explicit_grid
from .utils.checks import (
    check_choice,
    check_finite_tensor,
    check_non_negative_int,
    check_number,
    check_positive_int,
    check_timestep,
    short_repr,
)

# the families' names of the pooled text embeddings in their conditioning dicts (SDXL; SD3 and Flux)
POOLED_KEYS = ("text_embeds", "pooled_projections")


class DiffusionCLIPInputsMixin:
    """`check_inputs`, `prepare_image`, `prepare_condition` and the grid and batch helpers of the pipeline."""

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
        num_fixed_point_iterations=0,
        timesteps=None,
        sigmas=None,
        prompt=None,
        prompt_embeds=None,
        pooled_prompt_embeds=None,
        negative_prompt=None,
        negative_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
    ) -> None:
        """Fails early, with the argument's name and value, on anything `invert`/`edit` cannot use."""
        if timesteps is None:
            check_timestep(t0, "t0", self.num_train_timesteps)
        else:
            self.custom_grid(timesteps)
        if sigmas is not None:
            raise ValueError(
                "`sigmas` is not supported: inversion and generation share an integer grid, which for a flow model "
                "the scheduler maps to sigmas through its shift; pass that grid as `timesteps` (any family), or "
                f"`t0` and the step counts. Got sigmas={short_repr(sigmas)}."
            )
        check_positive_int(num_inversion_steps, "num_inversion_steps")
        check_positive_int(num_inference_steps, "num_inference_steps")
        check_non_negative_int(num_fixed_point_iterations, "num_fixed_point_iterations")
        check_number(eta, "eta", minimum=0)
        if eta != 0 and not self.family.supports_eta:
            raise ValueError(f"`eta` must be 0 for a {self.family.name} model (deterministic Euler steps), got {eta}.")
        check_choice(output_type, "output_type", OUTPUT_TYPES)
        if image is None and latents is None:
            raise ValueError("Pass `image` (to invert) or `latents` (x_t0 from `invert`).")
        if image is not None:
            check_image(image)
            if self.image_latents(image) is not None:
                check_finite_tensor(image, "image")
        if latents is not None:
            c, s = self.family.latent_channels, self.family.sample_size
            if not torch.is_tensor(latents) or latents.ndim != 4 or tuple(latents.shape[1:]) != (c, s, s):
                shape = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
                raise ValueError(f"`latents` must be a (batch, {c}, {s}, {s}) tensor, got {shape}.")
            check_finite_tensor(latents, "latents")
        generators = generator if isinstance(generator, list) else [generator]
        if not all(g is None or isinstance(g, torch.Generator) for g in generators):
            raise TypeError(
                f"`generator` must be a `torch.Generator`, a list of them or None, got {short_repr(generator)}."
            )
        if isinstance(generator, list):
            batch = batch_size_of(image, latents)
            if len(generator) != batch:
                raise ValueError(
                    f"`generator` is a list of {len(generator)} generators, but the batch size is {batch}."
                )
        if callback_on_step_end_tensor_inputs is not None:
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(
                    f"`callback_on_step_end_tensor_inputs` may hold {self._callback_tensor_inputs}, got {unknown}."
                )
        _check_embeds("prompt", prompt, prompt_embeds, pooled_prompt_embeds)
        _check_embeds("negative_prompt", negative_prompt, negative_prompt_embeds, negative_pooled_prompt_embeds)

    # ---- images ----------------------------------------------------------------------------------------------

    def prepare_image(self, image, name: str = "image") -> torch.Tensor:
        """``image`` (any form `invert` accepts) as the model's input: NCHW in [-1, 1], on the execution device, in the
        UNet's dtype. ``name`` is the argument named in error messages."""
        x0 = preprocess_image(image, self.resolution, self.image_channels, name=name)
        return x0.to(device=self._execution_device, dtype=self.family.image_dtype)

    def image_latents(self, image) -> torch.Tensor | None:
        """``image`` itself when it holds the autoencoder's latents of images rather than images, else `None`.

        As diffusers' image-to-image pipelines read their ``image``: a tensor of shape ``(batch, latent_channels,
        sample_size, sample_size)`` of a latent family whose latents have another channel count than its images
        (Stable Diffusion's 4, Flux's 16 unpacked; not an LDM's 3-channel VQ latents, which read as small images).
        The latents are in the denoiser's space, as `encode_image` and ``output_type="latent"`` give them.
        """
        family = self.family
        if not torch.is_tensor(image) or isinstance(image, PreparedImages) or family.autoencoder is None:
            return None
        c, s = family.latent_channels, family.sample_size
        if c == family.image_channels or image.ndim != 4 or tuple(image.shape[1:]) != (c, s, s):
            return None
        return image

    def _repeat_inputs(self, image, latents, num_images_per_prompt: int, encoding: str, eta: float):
        """``image`` (prepared) or ``latents``, each item repeated ``num_images_per_prompt`` times."""
        n = check_positive_int(num_images_per_prompt, "num_images_per_prompt")
        if n == 1:
            return image, latents
        if eta == 0 and (latents is not None or encoding == "ddim"):
            raise ValueError(
                f"`num_images_per_prompt`={n} would give {n} identical edits: the inversion and the generation are "
                "deterministic. Use `encoding='noise'` (with a `generator`) or `eta` > 0 for several edits per image."
            )
        if latents is not None:
            return None, latents.repeat_interleave(n, dim=0)
        if self.image_latents(image) is not None:
            return image.repeat_interleave(n, dim=0), None
        return PreparedImages(self.prepare_image(image).repeat_interleave(n, dim=0)), None

    # ---- the step grid ---------------------------------------------------------------------------------------

    def custom_grid(self, timesteps) -> list[int]:
        """A caller's ``timesteps`` as the ascending grid the families take (diffusers passes them descending, as
        the generation visits them; either order is accepted, repeats are not)."""
        if isinstance(timesteps, torch.Tensor):
            timesteps = timesteps.tolist()
        if not isinstance(timesteps, (list, tuple)):
            raise TypeError(f"`timesteps` must be a list of integers, got {short_repr(timesteps)}.")
        descending = len(timesteps) > 1 and timesteps[0] > timesteps[-1]
        ordered = list(reversed(timesteps)) if descending else list(timesteps)
        return explicit_grid(ordered, self.num_train_timesteps, lowest=self.family.lowest_timestep)

    def grid(self, t0: int, num_steps: int, timesteps=None) -> list[int]:
        """The ascending grid ``[..., t0]`` of a walk: the family's from ``t0`` and ``num_steps``, or the caller's
        ``timesteps`` (then shared by the inversion and the generation, its highest point the depth ``t0``)."""
        return self.family.timesteps(t0, num_steps) if timesteps is None else self.custom_grid(timesteps)

    # ---- conditioning ----------------------------------------------------------------------------------------

    def prepare_condition(
        self, prompt, prompt_embeds, pooled_prompt_embeds, batch_size: int, prefix: str = "prompt", **conditioning
    ):
        """What the denoiser is conditioned on: `encode_prompt`'s output for ``prompt``, or the same structure from
        precomputed embeddings (diffusers' ``prompt_embeds`` and, for SDXL / SD3 / Flux, ``pooled_prompt_embeds``),
        each of batch 1 or ``batch_size``. ``prefix``: the arguments' names in errors (``"negative_prompt"`` for the
        negative side). ``conditioning``: SDXL's size conditioning."""
        if prompt_embeds is None:
            return self.encode_prompt(prompt, batch_size, **conditioning)
        embeds_name, pooled_name = f"{prefix}_embeds", _pooled_name(prefix)
        template = self.family.encode_prompt(None, 1, **conditioning)
        if template is None:
            raise ValueError(
                f"`{embeds_name}` needs a text-conditioned denoiser; this {self.family.name} model is unconditional."
            )
        hidden = _expanded(prompt_embeds, embeds_name, _hidden(template), batch_size)
        pooled_key = next((k for k in POOLED_KEYS if isinstance(template, dict) and k in template), None)
        if pooled_key is None:
            if pooled_prompt_embeds is not None:
                raise ValueError(f"`{pooled_name}` is not used by a {self.family.name} model: leave it out.")
            return hidden if not isinstance(template, dict) else {**template, "encoder_hidden_states": hidden}
        if pooled_prompt_embeds is None:
            raise ValueError(
                f"A {self.family.name} model needs `{pooled_name}` with `{embeds_name}` (as diffusers' pipeline "
                "computes them in `encode_prompt`)."
            )
        pooled = _expanded(pooled_prompt_embeds, pooled_name, template[pooled_key], batch_size)
        extra = {k: v.expand(batch_size, *v.shape[1:]) for k, v in template.items() if k != pooled_key}
        return {**extra, "encoder_hidden_states": hidden, pooled_key: pooled}

    def _check_guidance(self, guidance_scale, prompt, negative_prompt, lora_scale: float, embeds=None) -> float:
        """`edit`'s checks of classifier-free guidance and of the LoRA scale, before any work; the checked scale.
        ``embeds``: ``(prompt_embeds, negative_prompt_embeds)``."""
        prompt_embeds, negative_embeds = embeds or (None, None)
        guidance_scale = check_number(guidance_scale, "guidance_scale", minimum=1)
        if guidance_scale > 1 and (self.text_encoder is None or not (prompt or prompt_embeds is not None)):
            raise ValueError(
                f"`guidance_scale`={guidance_scale} needs a text-conditioned UNet and a non-empty `prompt` (or "
                f"`prompt_embeds`), got prompt={prompt!r:.200}."
            )
        if (negative_prompt is not None or negative_embeds is not None) and guidance_scale == 1:
            name = "negative_prompt" if negative_prompt is not None else "negative_prompt_embeds"
            raise ValueError(f"`{name}` is the unconditional side of guidance: it needs `guidance_scale` > 1.")
        if lora_scale != 1 and self.fused_loras:
            raise ValueError("A LoRA scale has no effect on fused adapters: call `unfuse_lora()` first.")
        return guidance_scale


def _check_embeds(prefix: str, prompt, embeds, pooled) -> None:
    """diffusers' rules: a prompt or its embeddings, not both; pooled embeddings only with the embeddings; tensors."""
    for name, value in ((f"{prefix}_embeds", embeds), (_pooled_name(prefix), pooled)):
        if value is not None and not torch.is_tensor(value):
            raise TypeError(f"`{name}` must be a tensor, got {short_repr(value)}.")
        if value is not None:
            check_finite_tensor(value, name)
    if prompt is not None and embeds is not None:
        raise ValueError(f"Pass `{prefix}` or `{prefix}_embeds`, not both.")
    if pooled is not None and embeds is None:
        raise ValueError(f"`{_pooled_name(prefix)}` needs `{prefix}_embeds` too.")


def _pooled_name(prefix: str) -> str:
    return "pooled_prompt_embeds" if prefix == "prompt" else "negative_pooled_prompt_embeds"


def _hidden(template) -> torch.Tensor:
    return template["encoder_hidden_states"] if isinstance(template, dict) else template


def _expanded(value: torch.Tensor, name: str, like: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``value`` checked against the family's own tensor ``like`` (its trailing size; the token count of hidden
    states may differ, as diffusers allows) and expanded to ``batch_size``, in ``like``'s dtype and device."""
    if value.ndim != like.ndim or value.shape[-1] != like.shape[-1]:
        want = ("batch", "tokens", like.shape[-1]) if like.ndim == 3 else ("batch", like.shape[-1])
        raise ValueError(f"`{name}` must have shape {want} for this model, got {tuple(value.shape)}.")
    if value.shape[0] not in (1, batch_size):
        raise ValueError(f"`{name}` has batch {value.shape[0]} for {batch_size} images: pass 1 or {batch_size}.")
    return value.to(device=like.device, dtype=like.dtype).expand(batch_size, *value.shape[1:])

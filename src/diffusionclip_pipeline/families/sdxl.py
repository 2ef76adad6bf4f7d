"""Stable Diffusion XL (`StableDiffusionXLPipeline` layout: ``vae``, ``text_encoder`` (CLIPTextModel),
``text_encoder_2`` (CLIPTextModelWithProjection), ``tokenizer``, ``tokenizer_2``, ``unet`` =
`UNet2DConditionModel` with ``addition_embed_type="text_time"``; SDXL-Turbo / Lightning-style checkpoints too).

Conditioning as `StableDiffusionXLPipeline.encode_prompt` and `_get_add_time_ids` do it: both encoders' penultimate
hidden states concatenated (``encoder_hidden_states``), the pooled projection of ``text_encoder_2``
(``text_embeds``) and the size conditioning ``time_ids`` = original size + crop top-left + target size (by default
the image's size, no crop, as the stock pipeline uses for an image of that size). The unconditional input of
classifier-free guidance is all zeros when the pipeline's ``force_zeros_for_empty_prompt`` is set (SDXL's default).
An fp16 VAE whose config has ``force_upcast`` encodes and decodes in fp32 (SDXL's VAE overflows in fp16).
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from ..utils.checks import check_prompt_or_empty
from . import autoencoders
from .sd import StableDiffusionFamily

SIZE_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size")


class StableDiffusionXLFamily(StableDiffusionFamily):
    """SDXL's `UNet2DConditionModel` (``text_time`` added conditioning) with two CLIP text encoders."""

    name = "sdxl"
    stock_pipeline = "StableDiffusionXLPipeline"

    @classmethod
    def matches(cls, components) -> bool:
        unet = components["unet"]
        return isinstance(unet, UNet2DConditionModel) and unet.config.get("addition_embed_type") == "text_time"

    @classmethod
    def check_components(cls, components) -> None:
        unet = components["unet"]
        encoders = {
            name: components.get(name) for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        }
        if encoders["text_encoder"] is None and encoders["text_encoder_2"] is not None:
            raise ValueError(
                "This looks like the SDXL refiner (`text_encoder_2` without `text_encoder`, aesthetic-score "
                "conditioning): it is not supported; load the SDXL base model."
            )
        missing = [name for name, value in encoders.items() if value is None]
        if missing:
            raise ValueError(
                "`unet` is an SDXL UNet (addition_embed_type='text_time'): pass "
                + ", ".join(f"`{name}`" for name in missing)
                + "."
            )
        if components.get("vae") is None:
            raise ValueError("An SDXL `unet` needs its `vae`.")
        width = encoders["text_encoder"].config.hidden_size + encoders["text_encoder_2"].config.hidden_size
        if width != unet.config.cross_attention_dim:
            raise ValueError(
                f"`text_encoder` and `text_encoder_2` give {width}-wide hidden states together, but `unet` attends to "
                f"{unet.config.cross_attention_dim}."
            )
        time_ids = 6  # original size, crop top-left, target size (the refiner's 5 include an aesthetic score)
        projection = encoders["text_encoder_2"].config.projection_dim
        expected = unet.config.addition_time_embed_dim * time_ids + projection
        if unet.add_embedding.linear_1.in_features != expected:
            raise ValueError(
                f"`unet` expects added conditioning of width {unet.add_embedding.linear_1.in_features}, but "
                f"`text_encoder_2`'s projection ({projection}) and 6 size values "
                f"give {expected} (a refiner UNet, or mismatched components)."
            )

    # 2. images <-> latents: the fp16 VAE overflows, so it runs in fp32 where its config asks for it -------------

    def _vae_dtype(self) -> torch.dtype:
        vae = self.autoencoder
        return torch.float32 if vae.dtype == torch.float16 and vae.config.get("force_upcast", False) else vae.dtype

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        vae, dtype = self.autoencoder, self._vae_dtype()
        if dtype == vae.dtype:
            return super().encode(images)
        with _upcast(vae):
            return autoencoders.encode(vae, images.to(dtype)).to(self.pipe.denoiser.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae, dtype = self.autoencoder, self._vae_dtype()
        if dtype == vae.dtype:
            return super().decode(latents)
        with _upcast(vae):
            return autoencoders.decode(vae, latents.to(dtype))

    # 3. conditioning -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(
        self, prompt: str | None, batch_size: int = 1, original_size=None, crops_coords_top_left=None, target_size=None
    ) -> dict[str, torch.Tensor]:
        """``{"encoder_hidden_states", "text_embeds", "time_ids"}`` for ``prompt`` (`None`: the empty prompt), each
        repeated over ``batch_size``; the sizes default to the pipeline's resolution and no crop."""
        hidden, pooled = two_clip_states(self.pipe, check_prompt_or_empty(prompt, "prompt"))
        # the last encoder's pooled projection (text_embeds)
        return self._condition(hidden, pooled[-1], batch_size, original_size, crops_coords_top_left,
                               target_size)  # fmt: skip

    def encode_negative(self, batch_size: int = 1) -> dict[str, torch.Tensor]:
        """The unconditional input of classifier-free guidance: zeros with ``force_zeros_for_empty_prompt`` (as
        `StableDiffusionXLPipeline` does for a missing negative prompt), else the encoded empty prompt."""
        condition = self.encode_prompt(None, batch_size)
        if self.pipe.config.get("force_zeros_for_empty_prompt", True):
            for key in ("encoder_hidden_states", "text_embeds"):
                condition[key] = torch.zeros_like(condition[key])
        return condition

    def _condition(self, hidden, pooled, batch_size, original_size, crops_coords_top_left, target_size) -> dict:
        side = self.pipe.resolution
        sizes = {
            "original_size": original_size or (side, side),
            "crops_coords_top_left": crops_coords_top_left or (0, 0),
            "target_size": target_size or (side, side),
        }
        for name, value in sizes.items():
            if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(type(v) is int for v in value)):
                raise ValueError(f"`{name}` must be a pair of integers (height, width), got {value!r:.80}.")
        time_ids = [v for name in SIZE_CONDITIONING for v in sizes[name]]
        dtype = self.pipe.denoiser.dtype
        return {
            "encoder_hidden_states": hidden.to(dtype).expand(batch_size, -1, -1),
            "text_embeds": pooled.to(dtype).expand(batch_size, -1),
            "time_ids": torch.tensor([time_ids], dtype=dtype, device=hidden.device).expand(batch_size, -1),
        }

    # 4. the denoiser call ------------------------------------------------------------------------------------

    def predict(self, denoiser, sample: torch.Tensor, timestep: int, condition=None) -> torch.Tensor:
        n = sample.shape[0]
        t = torch.tensor(int(timestep), device=sample.device)
        added = {"text_embeds": condition["text_embeds"][:n], "time_ids": condition["time_ids"][:n]}
        return denoiser(sample, t, encoder_hidden_states=condition["encoder_hidden_states"][:n],
                        added_cond_kwargs=added).sample  # fmt: skip


def two_clip_states(pipe, text: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``text`` through ``pipe.text_encoder`` and ``pipe.text_encoder_2`` as SDXL and SD3 condition on it: both
    encoders' penultimate hidden states side by side, and each encoder's pooled output (projection), in that order."""
    hidden, pooled = [], []
    for tokenizer, text_encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer(
            [text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        output = text_encoder(ids.to(pipe._execution_device), output_hidden_states=True)
        hidden.append(output.hidden_states[-2])  # the penultimate layer
        pooled.append(output[0])
    return torch.cat(hidden, dim=-1), pooled


class _upcast:
    """Runs the block with ``module`` in fp32, then puts it back in its dtype."""

    def __init__(self, module):
        self.module, self.dtype = module, module.dtype

    def __enter__(self):
        self.module.to(torch.float32)

    def __exit__(self, *args):
        self.module.to(self.dtype)
        return False

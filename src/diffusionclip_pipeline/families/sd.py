"""Stable Diffusion 1.x / 2.x (`StableDiffusionPipeline` layout: ``vae`` = `AutoencoderKL`, ``text_encoder`` +
``tokenizer``, ``unet`` = `UNet2DConditionModel`; the safety checker and feature extractor are not loaded): a
text-conditioned UNet on the VAE's latents, conditioned on the text encoder's last hidden states."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from ..utils.checks import check_prompt_or_empty
from .ldm import LatentFamily


class StableDiffusionFamily(LatentFamily):
    """`UNet2DConditionModel` + `AutoencoderKL` + a CLIP text encoder (epsilon or v prediction)."""

    name = "sd"
    stock_pipeline = "StableDiffusionPipeline"

    @classmethod
    def matches(cls, components) -> bool:
        return isinstance(components["unet"], UNet2DConditionModel)

    @classmethod
    def check_components(cls, components) -> None:
        unet, text_encoder, tokenizer = components["unet"], components.get("text_encoder"), components.get("tokenizer")
        if text_encoder is None or tokenizer is None:
            raise ValueError(
                "`unet` is a text-conditioned `UNet2DConditionModel`: pass its `text_encoder` and `tokenizer` "
                f"(got text_encoder={type(text_encoder).__name__}, tokenizer={type(tokenizer).__name__})."
            )
        if unet.config.get("addition_embed_type") is not None or unet.config.get("class_embed_type") is not None:
            raise ValueError(
                "This `unet` needs extra conditioning (addition_embed_type="
                f"{unet.config.get('addition_embed_type')!r}, class_embed_type={unet.config.get('class_embed_type')!r}"
                "), as SDXL's does: only Stable Diffusion 1.x / 2.x UNets are supported."
            )
        if text_encoder.config.hidden_size != unet.config.cross_attention_dim:
            raise ValueError(
                f"`text_encoder` gives {text_encoder.config.hidden_size}-wide hidden states, but `unet` attends to "
                f"{unet.config.cross_attention_dim}."
            )
        if components.get("vae") is None and components.get("vqvae") is None:
            raise ValueError("A text-conditioned `unet` (Stable Diffusion) needs its `vae`.")
        if components.get("text_encoder_2") is not None or components.get("tokenizer_2") is not None:
            raise ValueError("`text_encoder_2` / `tokenizer_2` need an SDXL `unet` (addition_embed_type='text_time').")

    @torch.no_grad()
    def encode_prompt(self, prompt: str | None, batch_size: int = 1, **conditioning) -> torch.Tensor:
        """The text encoder's last hidden states for ``prompt`` (`None`: the empty prompt), repeated over the batch."""
        self.refuse_conditioning(conditioning)
        pipe = self.pipe
        text = check_prompt_or_empty(prompt, "prompt")
        tokens = pipe.tokenizer(
            [text], padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        )  # fmt: skip
        hidden = pipe.text_encoder(tokens.input_ids.to(pipe._execution_device))[0]
        return hidden.to(pipe.unet.dtype).expand(batch_size, -1, -1)

    def predict(self, denoiser, sample: torch.Tensor, timestep: int, condition=None) -> torch.Tensor:
        t = torch.tensor(int(timestep), device=sample.device)
        return denoiser(sample, t, encoder_hidden_states=condition[: sample.shape[0]]).sample

"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline` layout: ``transformer`` = `SD3Transformer2DModel`, ``vae`` =
`AutoencoderKL` with a ``shift_factor`` (16 channels in the real models), ``text_encoder`` + ``text_encoder_2`` =
`CLIPTextModelWithProjection` with their tokenizers, and an optional T5 ``text_encoder_3`` + ``tokenizer_3``, which may
be `None`): a velocity-predicting MMDiT on the VAE's latents, stepped by Euler on the shifted sigma grid
(`flow.FlowMatchFamily`).

The conditioning is exactly `StableDiffusion3Pipeline.encode_prompt`'s (tested against it): both CLIPs' penultimate
hidden states side by side, zero-padded to ``joint_attention_dim`` and followed by T5's states (zeros without T5),
and both CLIPs' pooled projections side by side as ``pooled_projections``.
"""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel

from ..utils.checks import check_prompt_or_empty
from . import autoencoders
from .flow import FlowMatchFamily
from .sdxl import two_clip_states

# the stock pipeline's T5 sequence length (`max_sequence_length`) and its CLIP context
T5_MAX_SEQUENCE_LENGTH = 256


class StableDiffusion3Family(autoencoders.AutoencoderLatents, FlowMatchFamily):
    """`SD3Transformer2DModel` + `AutoencoderKL` + two CLIP text encoders (+ an optional T5)."""

    name = "sd3"
    stock_pipeline = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"

    @classmethod
    def matches(cls, components) -> bool:
        return isinstance(components.get("transformer"), SD3Transformer2DModel)

    @classmethod
    def check_components(cls, components) -> None:
        transformer = components["transformer"]
        needed = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        missing = [name for name in needed if components.get(name) is None]
        if missing:
            raise ValueError(
                f"An SD3 `transformer` needs {', '.join(f'`{n}`' for n in missing)} (the `StableDiffusion3Pipeline` "
                "layout; only `text_encoder_3` / `tokenizer_3`, the T5, may be None)."
            )
        if (components.get("text_encoder_3") is None) != (components.get("tokenizer_3") is None):
            raise ValueError("Pass both `text_encoder_3` and `tokenizer_3` (SD3's T5), or neither.")
        if components.get("vqvae") is not None:
            raise ValueError("An SD3 `transformer` works on its `vae`'s latents; `vqvae` must be None.")
        encoders = (components["text_encoder"], components["text_encoder_2"])
        for name, encoder in zip(("text_encoder", "text_encoder_2"), encoders):
            if not hasattr(encoder.config, "projection_dim"):
                raise TypeError(f"`{name}` must be a `CLIPTextModelWithProjection`, got {type(encoder).__name__}.")
        config = transformer.config
        width = sum(int(e.config.hidden_size) for e in encoders)
        if width > config.joint_attention_dim:
            raise ValueError(
                f"`text_encoder` and `text_encoder_2` give {width}-wide hidden states together, more than the "
                f"`transformer`'s joint_attention_dim {config.joint_attention_dim}."
            )
        pooled = sum(int(e.config.projection_dim) for e in encoders)
        if pooled != config.pooled_projection_dim:
            raise ValueError(
                f"`text_encoder` and `text_encoder_2` give {pooled}-wide pooled projections together, but the "
                f"`transformer` takes pooled_projection_dim {config.pooled_projection_dim}."
            )
        t5 = components.get("text_encoder_3")
        if t5 is not None and int(t5.config.d_model) != config.joint_attention_dim:
            raise ValueError(
                f"`text_encoder_3` (T5) is {t5.config.d_model} wide, but the `transformer`'s joint_attention_dim is "
                f"{config.joint_attention_dim}."
            )

    # 2. images <-> latents -----------------------------------------------------------------------------------

    @property
    def autoencoder(self):
        return self.pipe.vae

    # encode / decode: `AutoencoderLatents`, (mean - shift_factor) * scaling_factor as
    # `StableDiffusion3Img2ImgPipeline` encodes (with the posterior mean, so that the inversion is deterministic)

    # 3. conditioning -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompt: str | None, batch_size: int = 1, **conditioning) -> dict[str, torch.Tensor]:
        """``{"encoder_hidden_states", "pooled_projections"}`` for ``prompt`` (`None`: the empty prompt), as
        `StableDiffusion3Pipeline.encode_prompt` computes them (no ``clip_skip``), repeated over ``batch_size``."""
        self.refuse_conditioning(conditioning)
        pipe = self.pipe
        text = check_prompt_or_empty(prompt, "prompt")
        clip_hidden, pooled = two_clip_states(pipe, text)  # both CLIPs' penultimate states and pooled projections
        clip_hidden = clip_hidden.to(pipe.text_encoder.dtype)
        t5 = self._t5_hidden_states(text)
        clip_hidden = torch.nn.functional.pad(clip_hidden, (0, t5.shape[-1] - clip_hidden.shape[-1]))
        dtype = pipe.denoiser.dtype
        return {
            "encoder_hidden_states": torch.cat([clip_hidden, t5], dim=-2).to(dtype).expand(batch_size, -1, -1),
            "pooled_projections": torch.cat(pooled, dim=-1).to(dtype).expand(batch_size, -1),
        }

    def _t5_hidden_states(self, text: str) -> torch.Tensor:
        """T5's last hidden states (``max_sequence_length`` 256), or zeros of that shape without a T5."""
        pipe = self.pipe
        device = pipe._execution_device
        if pipe.text_encoder_3 is None:
            width = pipe.denoiser.config.joint_attention_dim
            return torch.zeros(1, T5_MAX_SEQUENCE_LENGTH, width, device=device, dtype=pipe.text_encoder.dtype)
        ids = pipe.tokenizer_3(
            [text], padding="max_length", max_length=T5_MAX_SEQUENCE_LENGTH, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        ).input_ids  # fmt: skip
        return pipe.text_encoder_3(ids.to(device))[0].to(pipe.text_encoder_3.dtype)

    # 4. the denoiser call ------------------------------------------------------------------------------------

    def predict(self, denoiser, sample: torch.Tensor, timestep: int, condition=None) -> torch.Tensor:
        """The velocity ``v ~ noise - x0`` at integer ``timestep`` (the model sees ``sigma * 1000``, as the stock
        pipeline passes the stock scheduler's timesteps)."""
        n = sample.shape[0]
        return denoiser(
            hidden_states=sample,
            timestep=self.model_timestep(timestep, sample),
            encoder_hidden_states=condition["encoder_hidden_states"][:n],
            pooled_projections=condition["pooled_projections"][:n],
            return_dict=False,
        )[0]

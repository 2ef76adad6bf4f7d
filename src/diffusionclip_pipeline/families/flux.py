"""Flux.1 (`FluxPipeline` layout: ``transformer`` = `FluxTransformer2DModel`, ``vae`` = `AutoencoderKL` with a
``shift_factor`` (16 channels in the real models), ``text_encoder`` = `CLIPTextModel` + ``tokenizer`` for the pooled
embedding, ``text_encoder_2`` = `T5EncoderModel` + ``tokenizer_2`` for the token sequence, both required): a
velocity-predicting MMDiT stepped by Euler on the dynamically shifted sigma grid (`flow.FlowMatchFamily`).

The family's latents are the VAE's, *unpacked* ``(batch, C, H / 8, W / 8)``, everywhere: `encode` / `decode`, the
pipeline's loops, adapter masks and training. Only `predict` packs them 2x2 into Flux's token sequence
(``(H / 16) * (W / 16)`` tokens of ``4 C`` channels, `pack_latents`, as `FluxPipeline._pack_latents`), builds the
rotary position ids as the stock pipeline does (``img_ids`` = ``(0, row, column)`` of each 2x2 patch, ``txt_ids`` =
zeros), calls the transformer at ``sigma`` (the stock pipeline's ``timestep / 1000``) and unpacks the velocity.

Choices, documented in docs/flow.md ("The Flux family"):

- **guidance** (`FluxFamily.guidance`, 1.0): the value given to the guidance embedding of guidance-distilled
  checkpoints (``transformer.config.guidance_embeds``: FLUX.1-dev; FLUX.1-schnell has none), the same while inverting,
  editing and fine-tuning. A distilled guidance g imitates classifier-free guidance of scale g, whose velocity is not
  the field the clean image lies on, so inverting and regenerating under it is lossy as CFG is for the UNets; 1.0
  is the distilled model's "no guidance", the analogue of the other families' ``guidance_scale=1``. The stock
  pipeline's default (3.5) is for sampling from noise. A subclass may set another value.
- **sample size**: `FluxTransformer2DModel` has no ``sample_size``; the working size is the VAE's ``sample_size``
  (1024 px in the FLUX.1 repositories, so 128 latents, the stock ``default_sample_size``) divided by its scale
  factor, or 128 latents when the VAE has none.
- **shift**: with ``use_dynamic_shifting`` (the FLUX.1 schedulers), ``mu`` is `dynamic_shift_mu` of the token count,
  as the stock pipeline's ``calculate_shift``: 0.5 at 256 px, 1.15 at 1024 px.

Kontext, Fill and Control checkpoints are refused: Fill / Control transformers take extra input channels (image or
control latents concatenated to the noisy ones), caught by their ``in_channels``; a Kontext transformer has the
plain layout, so its repository is refused by its pipeline class (`families.check_layout`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import FluxTransformer2DModel
from transformers import CLIPTextModel, T5EncoderModel

from ..scheduling_flow_match_grid import dynamic_shift_mu
from ..utils.checks import check_prompt_or_empty
from . import autoencoders
from .flow import FlowMatchFamily

# the stock `FluxPipeline.encode_prompt`'s T5 sequence length (``max_sequence_length``)
T5_MAX_SEQUENCE_LENGTH = 512
# the stock `FluxPipeline.default_sample_size` (latents; 1024 px), used when the VAE's config has no sample size
DEFAULT_SAMPLE_SIZE = 128
PATCH = 2  # the stock pipeline packs 2x2 latent patches into one token
# a bound on the working size read from a folder's VAE config (as `families.MAX_SAMPLE_SIZE` for the denoisers'):
# a crafted value would otherwise allocate gigabytes when images are resized to it
MAX_SAMPLE_SIZE = 4096


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, (H / 2) * (W / 2), 4 C)``: one token per 2x2 patch (`FluxPipeline._pack_latents`)."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for ``height x width`` latents (`FluxPipeline._unpack_latents`)."""
    b, _, channels = tokens.shape
    tokens = tokens.view(b, height // PATCH, width // PATCH, channels // (PATCH * PATCH), PATCH, PATCH)
    return tokens.permute(0, 3, 1, 4, 2, 5).reshape(b, channels // (PATCH * PATCH), height, width)


def latent_image_ids(height: int, width: int, device) -> torch.Tensor:
    """The rotary position ids of the packed tokens of ``height x width`` latents: ``(0, row, column)`` per 2x2 patch,
    as `FluxPipeline._prepare_latent_image_ids` (float32: the position embedding reads them as floats)."""
    rows, cols = height // PATCH, width // PATCH
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device)


class FluxFamily(autoencoders.AutoencoderLatents, FlowMatchFamily):
    """`FluxTransformer2DModel` + `AutoencoderKL` + a CLIP text encoder (pooled) + a T5 (the token sequence)."""

    name = "flux"
    stock_pipeline = "FluxPipeline"
    denoiser_name = "transformer"
    # the side of the latent patch packed into one token: the transformer takes PATCH**2 x the VAE's channels
    latent_packing: ClassVar[int] = PATCH
    # the guidance embedding's value while inverting, editing and fine-tuning (module docstring)
    guidance: ClassVar[float] = 1.0

    @classmethod
    def matches(cls, components) -> bool:
        return isinstance(components.get("transformer"), FluxTransformer2DModel)

    @classmethod
    def check_components(cls, components) -> None:
        needed = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        missing = [name for name in needed if components.get(name) is None]
        if missing:
            raise ValueError(
                f"A Flux `transformer` needs {', '.join(f'`{n}`' for n in missing)} (the `FluxPipeline` layout: a "
                "CLIP `text_encoder` for the pooled embedding and a T5 `text_encoder_2`, with their tokenizers)."
            )
        extra = [name for name in ("vqvae", "text_encoder_3", "tokenizer_3") if components.get(name) is not None]
        if extra:
            raise ValueError(f"{', '.join(f'`{n}`' for n in extra)} must be None for a Flux `transformer`.")
        config = components["transformer"].config
        out_channels = config.out_channels or config.in_channels
        if out_channels != config.in_channels:
            raise ValueError(
                f"The Flux `transformer` takes {config.in_channels} input channels but predicts {out_channels}: a "
                "Fill or Control checkpoint (image or control latents concatenated to the noisy ones), not supported."
            )
        text_encoder, t5 = components["text_encoder"], components["text_encoder_2"]
        if not isinstance(text_encoder, CLIPTextModel):
            raise TypeError(f"`text_encoder` must be a `CLIPTextModel`, got {type(text_encoder).__name__}.")
        if int(text_encoder.config.hidden_size) != config.pooled_projection_dim:
            raise ValueError(
                f"`text_encoder` pools {text_encoder.config.hidden_size}-wide embeddings, but the `transformer` takes "
                f"pooled_projection_dim {config.pooled_projection_dim}."
            )
        if not isinstance(t5, T5EncoderModel):
            raise TypeError(f"`text_encoder_2` must be a `T5EncoderModel`, got {type(t5).__name__}.")
        if int(t5.config.d_model) != config.joint_attention_dim:
            raise ValueError(
                f"`text_encoder_2` (T5) is {t5.config.d_model} wide, but the `transformer`'s joint_attention_dim is "
                f"{config.joint_attention_dim}."
            )
        size = cls._vae_sample_size(components["vae"])
        if size % PATCH or not PATCH <= size <= MAX_SAMPLE_SIZE:
            raise ValueError(
                f"The working latent size {size} (the `vae`'s sample_size / its scale factor) must be even, in "
                f"[{PATCH}, {MAX_SAMPLE_SIZE}], for 2x2 packing; got vae sample_size "
                f"{components['vae'].config.get('sample_size')!r:.40}."
            )

    @staticmethod
    def _vae_sample_size(vae) -> int:
        size = vae.config.get("sample_size", None)
        if isinstance(size, (list, tuple)) and size:
            size = size[0]
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            return DEFAULT_SAMPLE_SIZE if size is None else -1  # -1: refused by `check_components`
        return size // autoencoders.scale_factor(vae)

    # 2. images <-> latents -----------------------------------------------------------------------------------

    @property
    def autoencoder(self):
        return self.pipe.vae

    @property
    def sample_size(self) -> int:
        """The side of the (unpacked) latents: the VAE's ``sample_size`` / scale factor (128 for FLUX.1), or 128."""
        return self._vae_sample_size(self.autoencoder)

    @property
    def latent_channels(self) -> int:
        """The VAE's latent channels (the transformer takes four times as many, packed)."""
        return int(self.pipe.denoiser.config.in_channels) // (PATCH * PATCH)

    # encode / decode: `AutoencoderLatents`, (mean - shift_factor) * scaling_factor as `FluxImg2ImgPipeline` encodes
    # (with the posterior mean)

    # 3. conditioning -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompt: str | None, batch_size: int = 1, **conditioning) -> dict[str, torch.Tensor]:
        """``{"encoder_hidden_states", "pooled_projections"}`` for ``prompt`` (`None`: the empty prompt), as
        `FluxPipeline.encode_prompt` computes them (T5's last hidden states over 512 tokens, CLIP's pooled output),
        repeated over ``batch_size``."""
        self.refuse_conditioning(conditioning)
        pipe = self.pipe
        text = check_prompt_or_empty(prompt, "prompt")
        device = pipe._execution_device
        ids = pipe.tokenizer(
            [text], padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        pooled = pipe.text_encoder(ids.to(device), output_hidden_states=False).pooler_output
        ids = pipe.tokenizer_2(
            [text], padding="max_length", max_length=T5_MAX_SEQUENCE_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        hidden = pipe.text_encoder_2(ids.to(device), output_hidden_states=False)[0]
        dtype = pipe.denoiser.dtype
        return {
            "encoder_hidden_states": hidden.to(dtype).expand(batch_size, -1, -1),
            "pooled_projections": pooled.to(dtype).expand(batch_size, -1),
        }

    # 4. the denoiser call ------------------------------------------------------------------------------------

    def shift_mu(self, sample: torch.Tensor | None = None) -> float | None:
        """`dynamic_shift_mu` of the packed token count ``(H / 2) * (W / 2)`` of ``sample``'s latents (`None`: the
        working size's), or `None` when the scheduler does not shift dynamically."""
        config = self.scheduler_config
        if not config.get("use_dynamic_shifting", False):
            return None
        h, w = (self.sample_size,) * 2 if sample is None else sample.shape[-2:]
        return dynamic_shift_mu((h // PATCH) * (w // PATCH), config)

    def predict(self, denoiser, sample: torch.Tensor, timestep: int, condition=None) -> torch.Tensor:
        """The velocity ``v ~ noise - x0`` at integer ``timestep`` for unpacked ``sample`` latents: packed 2x2, the
        transformer called at ``sigma`` (the stock pipeline's ``timestep / 1000``) with `guidance` when it embeds one,
        and the output unpacked."""
        n, _, h, w = sample.shape
        hidden = condition["encoder_hidden_states"][:n]
        guidance = None
        if denoiser.config.guidance_embeds:
            guidance = torch.full((n,), self.guidance, dtype=torch.float32, device=sample.device)
        velocity = denoiser(
            hidden_states=pack_latents(sample),
            timestep=self.model_timestep(timestep, sample) / 1000,  # the stock pipeline's `timestep / 1000`
            guidance=guidance,
            pooled_projections=condition["pooled_projections"][:n],
            encoder_hidden_states=hidden,
            txt_ids=torch.zeros(hidden.shape[1], 3, device=sample.device),
            img_ids=latent_image_ids(h, w, sample.device),
            return_dict=False,
        )[0]
        return unpack_latents(velocity, h, w)

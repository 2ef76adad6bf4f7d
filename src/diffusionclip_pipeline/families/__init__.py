"""Model families: one module per family behind one protocol (`base.ModelFamily`), and the check that picks the
family of a component set before anything runs (or, for a repository, loads).

Six families today: a pixel DDPM (`pixel`: ``unet`` = `UNet2DModel`), an unconditional latent diffusion model
(`ldm`: ``vqvae`` = `VQModel` or ``vae`` = `AutoencoderKL`, + ``unet`` = `UNet2DModel`, as `LDMPipeline`), Stable
Diffusion 1.x / 2.x (`sd`: ``vae`` = `AutoencoderKL`, ``text_encoder`` + ``tokenizer``, ``unet`` =
`UNet2DConditionModel`), SDXL (`sdxl`: two text encoders and size conditioning), and the flow-matching Stable
Diffusion 3 (`sd3`: ``transformer`` = `SD3Transformer2DModel`, two CLIPs and an optional T5) and Flux.1 (`flux`:
``transformer`` = `FluxTransformer2DModel` on 2x2-packed latents, a CLIP and a T5), both on the step maths of `flow`.
Adding a family is adding one module and listing it in `FAMILIES` (see docs/design.md, "How to add a model family").
"""

from __future__ import annotations

import json
import os

from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel, VQModel

from . import autoencoders
from .base import ModelFamily
from .flow import FlowMatchFamily
from .flux import FluxFamily
from .ldm import LatentFamily
from .pixel import PixelFamily
from .sd import StableDiffusionFamily
from .sd3 import StableDiffusion3Family
from .sdxl import StableDiffusionXLFamily

__all__ = [
    "FAMILIES",
    "FlowMatchFamily",
    "FluxFamily",
    "LatentFamily",
    "ModelFamily",
    "PixelFamily",
    "StableDiffusion3Family",
    "StableDiffusionFamily",
    "StableDiffusionXLFamily",
    "check_components",
    "check_layout",
    "check_loaded",
]

# Bounds on sizes read from a folder's configs before anything is allocated from them: crafted values (10**9
# training timesteps, a 10**6-pixel sample size) would otherwise allocate gigabytes while loading. Real models use
# 1000 timesteps (a few use 4000) and sample sizes up to 256 (pixels) or 128 (latents).
MAX_NUM_TRAIN_TIMESTEPS = 10_000
MAX_SAMPLE_SIZE = 4096

# the first whose `matches` accepts a component set is its family
FAMILIES: tuple[type[ModelFamily], ...] = (
    StableDiffusion3Family, FluxFamily, StableDiffusionXLFamily, StableDiffusionFamily, LatentFamily, PixelFamily,
)  # fmt: skip

# the flow-matching transformers a family exists for
TRANSFORMERS = (SD3Transformer2DModel, FluxTransformer2DModel)

UNSUPPORTED_PIPELINES = (
    "StableDiffusion3ControlNet",
    # Flux: the FLUX.1 text-to-image layout is supported; Kontext (a reference image in the sequence), Fill and
    # Control (extra input channels), their ControlNets, Redux and FLUX.2 are not
    "FluxKontext",
    "FluxFill",
    "FluxControl",
    "FluxPrior",
    "Flux2",
    "Kandinsky",
    "StableDiffusionXLInpaint",
    "StableDiffusionXLInstruct",
)


def check_components(
    unet=None,
    vae=None,
    vqvae=None,
    text_encoder=None,
    tokenizer=None,
    text_encoder_2=None,
    tokenizer_2=None,
    transformer=None,
    text_encoder_3=None,
    tokenizer_3=None,
) -> type[ModelFamily]:
    """The family of this component set; `ValueError` / `TypeError` naming the component when it cannot work."""
    denoiser = _check_denoiser(unet, transformer)
    if vae is not None and vqvae is not None:
        raise ValueError("Pass at most one autoencoder: `vae` (AutoencoderKL) or `vqvae` (VQModel), not both.")
    if vae is not None and not isinstance(vae, autoencoders.VAES):
        names = ", ".join(f"`{c.__name__}`" for c in autoencoders.VAES)
        raise TypeError(f"`vae` must be one of {names}, got {type(vae).__name__} (a VQModel goes in `vqvae`).")
    if vqvae is not None and not isinstance(vqvae, VQModel):
        raise TypeError(f"`vqvae` must be a `VQModel`, got {type(vqvae).__name__}.")
    if unet is not None and (text_encoder_3 is not None or tokenizer_3 is not None):
        raise ValueError("`text_encoder_3` / `tokenizer_3` (a T5) belong to an SD3 `transformer`, not to a `unet`.")
    components = {
        "unet": unet, "transformer": transformer, "vae": vae, "vqvae": vqvae, "text_encoder": text_encoder,
        "tokenizer": tokenizer, "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2,
        "text_encoder_3": text_encoder_3, "tokenizer_3": tokenizer_3,
    }  # fmt: skip
    family = next(family for family in FAMILIES if family.matches(components))
    autoencoder = vae if vae is not None else vqvae
    name = "unet" if unet is not None else "transformer"
    packing = getattr(family, "latent_packing", 1) ** 2  # Flux packs 2x2 latent patches into one token
    if autoencoder is not None and autoencoder.config.latent_channels * packing != denoiser.config.in_channels:
        packed = f" (x{packing} packed: {autoencoder.config.latent_channels * packing})" if packing > 1 else ""
        raise ValueError(
            f"`{'vae' if vae is not None else 'vqvae'}` makes {autoencoder.config.latent_channels}-channel latents"
            f"{packed}, but `{name}` takes {denoiser.config.in_channels} input channels."
            + (" A Flux Fill or Control checkpoint (extra input channels) is not supported." if packing > 1 else "")
        )
    family.check_components(components)
    return family


def _check_denoiser(unet, transformer):
    """The one denoiser given: a ``unet`` (noise prediction) or a flow-matching ``transformer``."""
    if (unet is None) == (transformer is None):
        raise ValueError(
            "Pass exactly one denoiser: `unet` (a `UNet2DModel` or `UNet2DConditionModel`) or `transformer` (an "
            f"`SD3Transformer2DModel` or `FluxTransformer2DModel`); got unet={type(unet).__name__}, "
            f"transformer={type(transformer).__name__}."
        )
    if unet is not None and not isinstance(unet, (UNet2DModel, UNet2DConditionModel)):
        raise TypeError(f"`unet` must be a `UNet2DModel` or a `UNet2DConditionModel`, got {type(unet).__name__}.")
    if transformer is not None and not isinstance(transformer, TRANSFORMERS):
        names = ", ".join(f"`{c.__name__}`" for c in TRANSFORMERS)
        raise TypeError(f"`transformer` must be one of {names}, got {type(transformer).__name__}.")
    return unet if unet is not None else transformer


def check_layout(pretrained_model_name_or_path, kwargs: dict) -> None:
    """Refuses repositories of unsupported pipelines (SDXL, ...) before any weights load."""
    from diffusers import DiffusionPipeline

    path = os.fspath(pretrained_model_name_or_path)
    load_kwargs = {k: kwargs[k] for k in ("cache_dir", "local_files_only", "token", "revision") if k in kwargs}
    try:
        config = DiffusionPipeline.load_config(path, **load_kwargs)
    except (OSError, ValueError):
        return  # let `from_pretrained` report the missing or unreachable repository in its own words
    if os.path.isdir(path):
        _check_folder_configs(path)
    name = str(config.get("_class_name", ""))
    if any(name.startswith(prefix) for prefix in UNSUPPORTED_PIPELINES):
        raise ValueError(
            f"{path!r} is a {name} repository: DiffusionCLIPPipeline supports DDPM, LDM, Stable Diffusion 1.x / 2.x, "
            "SDXL, Stable Diffusion 3 and Flux.1 (text-to-image) layouts."
        )

    def given(name: str) -> bool:  # a saved component is [library, class]; a saved None is [null, null]
        entry = config.get(name)
        return isinstance(entry, (list, tuple)) and bool(entry) and entry[0] is not None

    if config.get("requires_aesthetics_score") or (given("text_encoder_2") and not given("text_encoder")):
        raise ValueError(
            f"{path!r} is the SDXL refiner (aesthetic-score conditioning, no first text encoder): it is not "
            "supported; load the SDXL base model."
        )


def _check_folder_configs(path: str) -> None:
    """Bounds on the sizes a local folder's scheduler and UNet configs ask for (see `MAX_NUM_TRAIN_TIMESTEPS`)."""
    bounds = {
        os.path.join("scheduler", "scheduler_config.json"): ("num_train_timesteps", MAX_NUM_TRAIN_TIMESTEPS),
        os.path.join("unet", "config.json"): ("sample_size", MAX_SAMPLE_SIZE),
        os.path.join("transformer", "config.json"): ("sample_size", MAX_SAMPLE_SIZE),
    }
    for name, (key, limit) in bounds.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        try:
            with open(file, encoding="utf-8") as f:
                value = json.load(f).get(key)
        except (OSError, ValueError, RecursionError, AttributeError) as error:
            raise ValueError(f"{file!r} is not a readable JSON config: {type(error).__name__}.") from error
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(
            v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= limit) for v in values
        ):
            raise ValueError(f"{file!r} sets `{key}` to {value!r:.60}; this package accepts integers in [1, {limit}].")


def check_loaded(pipe) -> None:
    """After loading: every weight is materialised (not left on the ``meta`` device by a folder with missing weight
    files) and finite, and the noise schedule is a valid one (``0 < beta < 1``, so ``alphas_cumprod`` decreases in
    (0, 1)). A `ValueError` naming the component; nothing would otherwise fail until an edit came out black."""
    import torch

    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        for key, tensor in [*component.named_parameters(), *component.named_buffers()]:
            if tensor.device.type == "meta":
                raise ValueError(f"`{name}` has no weights for `{key}` (missing or incomplete weight files).")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"`{name}`'s weight `{key}` holds NaN or infinite values.")
    betas = getattr(pipe.scheduler, "betas", None)
    if betas is not None and not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError(
            f"The scheduler's betas must lie in (0, 1), got values in [{float(betas.min()):.3g}, "
            f"{float(betas.max()):.3g}] (beta_start={pipe.scheduler.config.get('beta_start')!r}, "
            f"beta_end={pipe.scheduler.config.get('beta_end')!r})."
        )

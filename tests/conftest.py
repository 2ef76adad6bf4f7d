"""Tiny real components built in-process from configs (random weights, no hub access)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode  # the GPT-2 / CLIP byte table

from diffusionclip_pipeline import DiffusionCLIPPipeline
from diffusionclip_pipeline.loaders import lora_state

# Toy-sized models run fastest on one thread, and the suite must not thrash when the machine is busy.
torch.set_num_threads(1)


WORDS = ("a", "photo", "of", "the", "red", "blue", "green", "circle", "square", "face", "smiling")


def make_tokenizer(max_length: int = 40) -> CLIPTokenizer:
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for word in WORDS:  # merge each word left to right into one token
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for nxt in pieces[1:]:
            merges.append((current, nxt))
            current = current + nxt
            vocab.setdefault(current, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def make_clip(tokenizer: CLIPTokenizer, image_size: int = 16, seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    vocab_size = len(tokenizer)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=eos - 1,
            eos_token_id=eos,
            pad_token_id=eos,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=4,
        ),
        projection_dim=16,
    )
    return CLIPModel(config).eval()


def make_unet(sample_size: int = 16, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    ).eval()


def make_scheduler() -> DDPMScheduler:
    # as google/ddpm-celebahq-256 ships it: linear betas, clip_sample=True (the pipeline must turn it off)
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def make_pipeline(sample_size: int = 16, seed: int = 0, with_clip: bool = True) -> DiffusionCLIPPipeline:
    tokenizer = make_tokenizer() if with_clip else None
    pipe = DiffusionCLIPPipeline(
        unet=make_unet(sample_size, seed),
        scheduler=make_scheduler(),
        clip_model=make_clip(tokenizer, sample_size) if with_clip else None,
        clip_tokenizer=tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe() -> DiffusionCLIPPipeline:
    return make_pipeline()


@pytest.fixture(scope="session")
def tokenizer() -> CLIPTokenizer:
    return make_tokenizer()


@pytest.fixture
def clip_model(tokenizer) -> CLIPModel:
    return make_clip(tokenizer)


@pytest.fixture
def registry(monkeypatch):
    """A fresh CLI plugin registry: none registered, and the installed plugins' entry points hidden."""
    from diffusionclip_pipeline.commands import registry

    monkeypatch.setattr(registry, "_registry", registry._Registry())
    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    return registry._registry


@pytest.fixture
def setup(tmp_path):
    """A saved tiny pipeline folder (``tmp_path/pipe``) and three input PNGs (``tmp_path/imgs``), for CLI tests."""
    from diffusionclip_pipeline.image_processing import postprocess_image

    make_pipeline().save_pretrained(tmp_path / "pipe")
    (tmp_path / "imgs").mkdir()
    for i, image in enumerate(postprocess_image(random_images(3))):
        image.save(tmp_path / "imgs" / f"img{i}.png")
    return tmp_path


def add_random_adapter(pipe, name, rank=2, alpha=4.0, seed=0, targets=("to_q", "to_k", "conv1")):
    """A trained-looking adapter without training: random A and B (B is zero after injection)."""
    torch.manual_seed(seed)
    denoiser = pipe.denoiser  # the unet, or a flow model's transformer
    lora_state.add_adapter(denoiser, lora_state.LoraSettings(rank=rank, alpha=alpha, target_modules=targets), name)
    with torch.no_grad():
        for p in lora_state.adapter_parameters(denoiser, name):
            p.copy_(torch.randn_like(p) * 0.2)
            p.requires_grad_(False)
    lora_state.set_provenance(denoiser, name, {"prompt_src": "red circle", "prompt_tar": "blue circle"})


def adapted_pixel_pipeline(name: str = "smile") -> DiffusionCLIPPipeline:
    """The toy pixel pipeline (no CLIP, quiet) with one random adapter ``name``, active."""
    pipe = make_pipeline(with_clip=False)
    pipe.set_progress_bar_config(disable=True)
    add_random_adapter(pipe, name)
    pipe.set_adapters([name])
    return pipe


def random_images(batch: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


# ---- latent models at toy size (as diffusers' own pipeline tests build them) ---------------------------------


def make_vae(seed: int = 0, latent_channels: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    ).eval()


def make_vqvae(seed: int = 0):
    from diffusers import VQModel

    torch.manual_seed(seed)
    return VQModel(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=3,
        num_vq_embeddings=32,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    ).eval()


def make_conditional_unet(seed: int = 0, cross_attention_dim: int = 32, prediction_type_channels: int = 4):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=prediction_type_channels,
        out_channels=prediction_type_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=4,
        attention_head_dim=4,
    ).eval()


def make_text_encoder(tokenizer: CLIPTokenizer, seed: int = 0, hidden_size: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=eos - 1,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return CLIPTextModel(config).eval()


def make_sd_components(seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """The components of a `StableDiffusionPipeline` at toy size: 16 px images, 8 x 8 x 4 latents."""
    tokenizer = make_tokenizer()
    scheduler = make_scheduler()
    scheduler.register_to_config(prediction_type=prediction_type)
    return dict(
        vae=make_vae(seed),
        text_encoder=make_text_encoder(tokenizer, seed),
        tokenizer=tokenizer,
        unet=make_conditional_unet(seed),
        scheduler=scheduler,
    )


def make_ldm_components(seed: int = 0) -> dict:
    """The components of an `LDMPipeline` at toy size: 16 px images, 8 x 8 x 3 latents."""
    return dict(vqvae=make_vqvae(seed), unet=make_unet(sample_size=8, seed=seed), scheduler=make_scheduler())


def make_sdxl_components(seed: int = 0) -> dict:
    """The components of a `StableDiffusionXLPipeline` at toy size (as diffusers' SDXL tests build them, offline):
    16 px images, 8 x 8 x 4 latents, two CLIP text encoders (32 + 32 wide, the second with a 32-wide projection)
    and size conditioning (6 ids x 8 + 32 = 80 added-embedding inputs)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=4,
    ).eval()
    encoder = make_text_encoder(tokenizer, seed)
    torch.manual_seed(seed + 1)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos,
        projection_dim=32,
    )  # fmt: skip
    scheduler = make_scheduler()
    return dict(
        vae=make_vae(seed),
        text_encoder=encoder,
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(config).eval(),
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )


def make_sd3_components(seed: int = 0, with_t5: bool = False) -> dict:
    """The components of a `StableDiffusion3Pipeline` at toy size (as diffusers' SD3 tests build them, offline): 16 px
    images, 8 x 8 x 4 latents (a VAE with a ``shift_factor``), an MMDiT of one joint block on 2 x 2 patches (16
    tokens), two CLIP text encoders with projection (16 + 16 wide hidden states, padded to the joint attention's 32;
    16 + 16 pooled), a shifted flow-matching scheduler (shift 3, as SD3's), and optionally a one-layer T5 (32 wide)
    that reads the CLIP tokenizer's ids."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer = make_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def text_encoder(offset: int) -> CLIPTextModelWithProjection:
        torch.manual_seed(seed + offset)
        config = CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, bos_token_id=eos - 1,
            eos_token_id=eos, pad_token_id=eos, projection_dim=16,
        )  # fmt: skip
        return CLIPTextModelWithProjection(config).eval()

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
    ).eval()  # fmt: skip
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
        norm_num_groups=4, shift_factor=0.0609, scaling_factor=1.5035,
    )  # fmt: skip
    components = dict(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder(1),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder(2),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    if with_t5:
        torch.manual_seed(seed + 3)
        t5 = T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=37, num_layers=1, num_heads=2, d_kv=8)
        components.update(text_encoder_3=T5EncoderModel(t5).eval(), tokenizer_3=tokenizer)
    return components


def make_flux_components(seed: int = 0, guidance_embeds: bool = True, in_channels: int = 16) -> dict:
    """The components of a `FluxPipeline` at toy size (as diffusers' Flux tests build them, offline): 16 px images,
    8 x 8 x 4 latents (a VAE with a ``shift_factor``) packed 2x2 into 16 tokens of 16 channels, one double-stream and
    one single-stream block (2 heads of 8, rotary axes 2 + 2 + 4) with the guidance embedding (FLUX.1-dev's), a CLIP
    text encoder for the pooled embedding (16 wide), a one-layer T5 (32 wide) that reads the CLIP tokenizer's ids (the
    stock pipeline only calls its ``tokenizer_2``), and Flux's dynamically shifted flow-matching scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = make_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(seed + 1)
    clip = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos,
    )  # fmt: skip
    text_encoder = CLIPTextModel(clip).eval()
    torch.manual_seed(seed + 2)
    t5 = T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=37, num_layers=1, num_heads=2, d_kv=8)
    text_encoder_2 = T5EncoderModel(t5).eval()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    ).eval()  # fmt: skip
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
        norm_num_groups=4, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    return dict(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
    )


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the app's tests serve only there)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_client(state):
    """Yields a `gradio_client.Client` of the web app over ``state``, served on a free port of 127.0.0.1; closes the
    server after (for a module-scoped fixture: ``yield from served_client(state)``)."""
    pytest.importorskip("gradio")
    from gradio_client import Client

    from diffusionclip_pipeline.commands import app

    demo = app.build_app(state)
    _, url, _ = app.launch(demo, port=free_port(), block=False)
    try:
        yield Client(url, verbose=False)
    finally:
        demo.close()

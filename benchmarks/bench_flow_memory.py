"""Training-memory ESTIMATE for LoRA fine-tuning of SD3.5-medium and Flux-dev (issue 31, "Memory"), from per-block
figures measured on the CPU with random weights in the real configs.

No GPU and no hub here, so the real configs are TRANSCRIBED below from the public ``transformer/config.json`` (and
``vae/config.json``) of stabilityai/stable-diffusion-3.5-medium and black-forest-labs/FLUX.1-dev, not downloaded;
every key is checked against the installed diffusers classes' ``__init__`` signatures before anything is built.

Measured, per transformer block of each kind at real width (SD3.5-medium: `JointTransformerBlock` with and without
the dual attention of its first 13 layers; Flux-dev: one `FluxTransformerBlock` and one `FluxSingleTransformerBlock`),
with rank-16 LoRA (peft) on the package's `FLOW_TARGET_MODULES` and the base frozen, batch 1, one forward + backward
at the token counts of 512 and 1024 px (SD3: (H/16)^2 image tokens + 333 text tokens, 77 CLIP + 256 T5; Flux:
(H/16)^2 + 512 T5 tokens):

- the bytes autograd saves for backward (`torch.autograd.graph.saved_tensors_hooks`, each tensor's untyped storage
  counted once by its data pointer, parameter storages excluded): the block's activation memory without
  checkpointing;
- the bytes of the block's inputs (hidden_states, encoder_hidden_states, temb): what gradient checkpointing keeps
  per block (temb is shared by all blocks, counted once per block here; Flux's shared rotary table is left out);
- parameter counts per block; whole-model counts from building the full model on the meta device.

Two precisions: ``fp32`` (all float32) and ``bf16`` (base weights bfloat16, LoRA weights float32, under
`torch.autocast(bfloat16)`: what `FinetuneConfig(mixed_precision="bf16")` does on a bfloat16 pipeline). The same
is measured for the decoders of the pixel-space CLIP loss (the 16-channel `AutoencoderKL` of SD3 / Flux and the
`AutoencoderTiny` of TAESD3 / TAEF1, gradients into the latents, weights frozen; the full decoder also with gradient
checkpointing) at 256 and 512 px, and for the vision tower of the loss's CLIP ViT-B/16 at 224 px. The estimate then
adds up weights, LoRA, gradients, Adam states and activations for each model, resolution and setting (see
`estimate_rows`; the results and their reading: docs/flow-memory.md).

    OMP_NUM_THREADS=1 nohup python benchmarks/bench_flow_memory.py --json build/flow_memory.json \
        > build/flow_memory.log 2>&1 &        # about 20 min on one core; resumable (finished rows are kept)
    python benchmarks/bench_flow_memory.py --estimate-only --json build/flow_memory.json   # the table again
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import time

import torch

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (transcribed)
SD35_MEDIUM_CONFIG = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)  # fmt: skip
# black-forest-labs/FLUX.1-dev, transformer/config.json (transcribed)
FLUX_DEV_CONFIG = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)  # fmt: skip
# the 16-channel VAE of SD3 / SD3.5 and Flux (same architecture; scaling/shift factors differ and do not matter here)
FLOW_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609,
)  # fmt: skip
# madebyollin/taesd3 and taef1 (AutoencoderTiny with 16 latent channels; the rest are the class defaults)
TAE_FLOW_CONFIG = dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)
TEXT_TOKENS = {"sd3.5-medium": 333, "flux-dev": 512}  # SD3: 77 CLIP + 256 T5; Flux: 512 T5 (max_sequence_length)
RESOLUTIONS = (512, 1024)
LORA_RANK = 16


def check_config(cls, config: dict) -> None:
    """Raises `ValueError` naming the keys of ``config`` that ``cls.__init__`` does not take."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise ValueError(f"`config` has keys {unknown} that {cls.__name__}.__init__ does not take.")


def meta_parameter_count(cls, config: dict, buffers: bool = False) -> int:
    """Parameters of ``cls(**config)`` built on the meta device (no memory); with ``buffers``, plus its buffers
    (SD3's 384 x 384 positional table is a buffer that the checkpoint stores)."""
    check_config(cls, config)
    with torch.device("meta"):
        model = cls(**config)
    count = sum(p.numel() for p in model.parameters())
    return count + (sum(b.numel() for b in model.buffers()) if buffers else 0)


def image_tokens(resolution: int) -> int:
    """Image tokens of SD3 / Flux at ``resolution`` px: 8x VAE downsampling, then 2x2 patches (SD3's patch embed or
    Flux's packing): (H / 16)^2."""
    return (resolution // 16) ** 2


# ---- one block ----------------------------------------------------------------------------------------------------


def build_block(kind: str, dim: int, heads: int, head_dim: int) -> torch.nn.Module:
    """One transformer block of ``kind`` (``sd3``, ``sd3_dual``, ``flux_double``, ``flux_single``) at width ``dim``."""
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    if kind in ("sd3", "sd3_dual"):
        return JointTransformerBlock(dim, heads, head_dim, qk_norm="rms_norm", use_dual_attention=kind == "sd3_dual")
    if kind == "flux_double":
        return FluxTransformerBlock(dim, heads, head_dim)
    if kind == "flux_single":
        return FluxSingleTransformerBlock(dim, heads, head_dim)
    raise ValueError(f"`kind` must be sd3, sd3_dual, flux_double or flux_single, got {kind!r}.")


def add_lora(module: torch.nn.Module, rank: int, target_modules) -> int:
    """Injects a rank-``rank`` LoRA (alpha = rank) into ``module``, freezes the base; returns the LoRA parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules)), module)
    count = 0
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
        count += p.numel() if "lora_" in name else 0
    return count


def block_inputs(kind: str, dim: int, head_dim: int, n_image: int, n_text: int, dtype, axes=None) -> dict:
    """Random inputs of a middle block: the streams require grad (LoRA upstream), temb and the rotary table not."""
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, n_image, dim, generator=g, dtype=dtype).requires_grad_(),
        "encoder_hidden_states": torch.randn(1, n_text, dim, generator=g, dtype=dtype).requires_grad_(),
        "temb": torch.randn(1, dim, generator=g, dtype=dtype),
    }
    if kind.startswith("flux"):
        from diffusers.models.transformers.transformer_flux import FluxPosEmbed

        side = max(1, int(n_image**0.5))
        ids = torch.zeros(n_text + n_image, 3)
        ids[n_text:, 1] = torch.arange(n_image) // side
        ids[n_text:, 2] = torch.arange(n_image) % side
        if axes is None:
            axes = (head_dim - 6 * (head_dim // 8), 3 * (head_dim // 8), 3 * (head_dim // 8))
        inputs["image_rotary_emb"] = FluxPosEmbed(10000, list(axes))(ids)
    return inputs


def _dtype(precision: str) -> torch.dtype:
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"`precision` must be 'fp32' or 'bf16', got {precision!r}.")
    return torch.bfloat16 if precision == "bf16" else torch.float32


@contextlib.contextmanager
def saved_tensor_bytes(exclude_storages=()):
    """Counts what autograd saves for backward inside the block: ``{"bytes": n, "tensors": k}``, each storage once
    (by data pointer), storages in ``exclude_storages`` (parameters: counted as weights) left out."""
    excluded = {int(p) for p in exclude_storages}
    seen: dict[int, tuple[int, str]] = {}
    result = {"bytes": 0, "tensors": 0, "by_dtype": {}}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in excluded and ptr != 0:
            seen[ptr] = (max(seen.get(ptr, (0, ""))[0], storage.nbytes()), str(t.dtype).replace("torch.", ""))
        result["tensors"] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["bytes"] = sum(n for n, _ in seen.values())
    for n, dtype in seen.values():
        result["by_dtype"][dtype] = result["by_dtype"].get(dtype, 0) + n


def _run_with_grad(module, inputs: dict, precision: str, call=None) -> tuple[dict, float]:
    """One forward (saved bytes counted) and one backward of a squared-mean loss; returns (saved, seconds)."""
    start = time.perf_counter()
    exclude = [p.untyped_storage().data_ptr() for p in module.parameters()]
    exclude += [b.untyped_storage().data_ptr() for b in module.buffers()]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with saved_tensor_bytes(exclude) as saved, autocast:
        out = call(module, inputs) if call is not None else module(**inputs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    loss = sum(o.float().pow(2).mean() for o in outs if torch.is_tensor(o) and o.requires_grad)
    loss.backward()
    return saved, time.perf_counter() - start


def measure_block(kind: str, dim: int, heads: int, head_dim: int, n_image: int, n_text: int, precision="fp32",
                  rank=LORA_RANK, target_modules=None, axes=None) -> dict:  # fmt: skip
    """Measures one LoRA-wrapped block of ``kind`` for one forward + backward at ``n_image`` + ``n_text`` tokens.

    Args:
        kind (`str`): ``sd3``, ``sd3_dual``, ``flux_double`` or ``flux_single``.
        precision (`str`, *optional*, defaults to ``"fp32"``): ``fp32``, or ``bf16`` (bfloat16 base, float32 LoRA,
            bfloat16 autocast).
        target_modules (`tuple`, *optional*): LoRA targets; defaults to the package's `FLOW_TARGET_MODULES`.
        axes (`tuple`, *optional*): Flux's rotary ``axes_dims_rope`` (sum ``head_dim``).

    Returns:
        `dict`: ``saved_bytes`` (activations kept for backward), ``input_bytes`` (what checkpointing keeps),
        ``block_params``, ``lora_params``, ``saved_tensors``, ``seconds``.
    """
    _dtype(precision)
    if target_modules is None:
        from diffusionclip_pipeline.families.flow import FLOW_TARGET_MODULES as target_modules
    torch.manual_seed(0)
    block = build_block(kind, dim, heads, head_dim)
    block_params = sum(p.numel() for p in block.parameters())
    dtype = _dtype(precision)
    block.to(dtype)
    lora_params = add_lora(block, rank, target_modules)
    for name, p in block.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # fp32 LoRA on a bf16 base, as the trainer does
    inputs = block_inputs(kind, dim, head_dim, n_image, n_text, dtype, axes)
    input_bytes = sum(inputs[k].numel() * inputs[k].element_size() for k in ("hidden_states", "encoder_hidden_states"))
    input_bytes += inputs["temb"].numel() * inputs["temb"].element_size()
    saved, seconds = _run_with_grad(block, inputs, precision)
    return {
        "kind": kind, "precision": precision, "n_image": n_image, "n_text": n_text, "saved_bytes": saved["bytes"],
        "saved_tensors": saved["tensors"], "input_bytes": input_bytes, "block_params": block_params,
        "lora_params": lora_params, "saved_by_dtype": saved["by_dtype"], "seconds": round(seconds, 1),
    }  # fmt: skip


# ---- the loss's decoders and CLIP -----------------------------------------------------------------------------------


def _checkpointed_decoder(vae, z: torch.Tensor, precision: str) -> dict:
    """The decoder with diffusers' gradient checkpointing (mid block and each up block a segment): what autograd saves
    outside the segments, plus every segment's inputs (kept for the recompute), plus the largest segment's own saved
    bytes (alive while it is recomputed in backward), each segment measured alone on its captured inputs."""
    segments = [vae.decoder.mid_block, *vae.decoder.up_blocks]
    captured: dict[int, tuple] = {}

    def capture(module, args) -> None:  # the first call's inputs (backward's recompute calls it again)
        captured.setdefault(id(module), (module, args))

    hooks = [m.register_forward_pre_hook(capture) for m in segments]
    vae.enable_gradient_checkpointing()
    try:
        outer, seconds = _run_with_grad(vae, {"z": z}, precision, call=lambda m, i: m.decode(i["z"]).sample)
    finally:
        for hook in hooks:
            hook.remove()
    kept = sum(a.numel() * a.element_size() for _, args in captured.values() for a in args if torch.is_tensor(a))
    largest = 0
    for module, args in captured.values():
        args = tuple(a.detach().requires_grad_() if torch.is_tensor(a) else a for a in args)
        saved, _ = _run_with_grad(module, {"args": args}, precision, call=lambda m, i: m(*i["args"]))
        largest = max(largest, saved["bytes"])
    return {"bytes": outer["bytes"] + kept + largest, "outside": outer["bytes"], "kept_inputs": kept,
            "largest_segment": largest, "seconds": seconds}  # fmt: skip


def measure_decoder(kind: str, resolution: int, precision: str = "bf16", config: dict | None = None) -> dict:
    """Decode of one ``resolution`` px image with gradients into the latents (weights frozen): ``kind`` ``kl`` (the
    16-channel `AutoencoderKL` of SD3 / Flux), ``kl_ckpt`` (the same with gradient checkpointing, as
    ``FinetuneConfig(decoder_gradient_checkpointing=True)``; see `_checkpointed_decoder`) or ``tiny``
    (`AutoencoderTiny`, TAESD3 / TAEF1)."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    if kind not in ("kl", "kl_ckpt", "tiny"):
        raise ValueError(f"`kind` must be 'kl', 'kl_ckpt' or 'tiny', got {kind!r}.")
    _dtype(precision)
    cls, default = (AutoencoderTiny, TAE_FLOW_CONFIG) if kind == "tiny" else (AutoencoderKL, FLOW_VAE_CONFIG)
    config = config or default
    check_config(cls, config)
    torch.manual_seed(0)
    vae = cls(**config).requires_grad_(False)
    dtype = _dtype(precision)
    vae.to(dtype)
    downscale = 8 if kind == "tiny" else 2 ** (len(vae.config.block_out_channels) - 1)
    side = resolution // downscale
    z = torch.randn(1, config.get("latent_channels", 4), side, side, dtype=dtype).requires_grad_()
    if kind == "kl_ckpt":
        saved = _checkpointed_decoder(vae, z, precision)
        seconds = saved.pop("seconds")
    else:
        saved, seconds = _run_with_grad(vae, {"z": z}, precision, call=lambda m, i: m.decode(i["z"]).sample)
    parts = {k: v for k, v in saved.items() if k not in ("bytes", "tensors")}
    return {"kind": kind, "precision": precision, "resolution": resolution, "saved_bytes": saved["bytes"], **parts,
            "decoder_params": sum(p.numel() for p in vae.decoder.parameters()),
            "params": sum(p.numel() for p in vae.parameters()), "seconds": round(seconds, 1)}  # fmt: skip


def clip_b16_config():
    """A ViT-B/16-sized `CLIPConfig` (openai/clip-vit-base-patch16's widths)."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           patch_size=16, image_size=224),
        projection_dim=512,
    )  # fmt: skip


def measure_clip(precision: str = "bf16") -> dict:
    """The loss's image side: CLIP ViT-B/16 image features of one 224 px view, gradients into the pixels."""
    from transformers import CLIPModel

    torch.manual_seed(0)
    clip = CLIPModel(clip_b16_config()).requires_grad_(False)
    dtype = _dtype(precision)
    clip.to(dtype)
    pixels = torch.randn(1, 3, 224, 224, dtype=dtype).requires_grad_()

    def call(m, i):
        features = m.get_image_features(pixel_values=i["pixel_values"])
        return getattr(features, "pooler_output", features)

    saved, seconds = _run_with_grad(clip, {"pixel_values": pixels}, precision, call=call)
    return {"precision": precision, "saved_bytes": saved["bytes"], "params": sum(p.numel() for p in clip.parameters()),
            "seconds": round(seconds, 1)}  # fmt: skip


def parameter_counts() -> dict:
    """Whole-model parameter counts on the meta device: the two transformers, the VAEs, CLIP and the text encoders
    (T5-XXL v1.1 encoder, CLIP-L, OpenCLIP bigG text towers, their public configs transcribed)."""
    from diffusers import AutoencoderKL, AutoencoderTiny, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def meta(build):
        with torch.device("meta"):
            return sum(p.numel() for p in build().parameters())

    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            projection_dim=768, vocab_size=49408, max_position_embeddings=77)  # fmt: skip
    clip_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            projection_dim=1280, vocab_size=49408, max_position_embeddings=77)  # fmt: skip
    t5 = T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
                  feed_forward_proj="gated-gelu")  # fmt: skip
    return {
        "sd3.5-medium": meta_parameter_count(SD3Transformer2DModel, SD35_MEDIUM_CONFIG),
        "sd3.5-medium_with_buffers": meta_parameter_count(SD3Transformer2DModel, SD35_MEDIUM_CONFIG, buffers=True),
        "flux-dev": meta_parameter_count(FluxTransformer2DModel, FLUX_DEV_CONFIG),
        "flux-dev_with_buffers": meta_parameter_count(FluxTransformer2DModel, FLUX_DEV_CONFIG, buffers=True),
        "vae": meta_parameter_count(AutoencoderKL, FLOW_VAE_CONFIG),
        "tae": meta_parameter_count(AutoencoderTiny, TAE_FLOW_CONFIG),
        "clip_b16": meta(lambda: CLIPModel(clip_b16_config())),
        "t5_xxl": meta(lambda: T5EncoderModel(t5)),
        "clip_l": meta(lambda: CLIPTextModelWithProjection(clip_l)),
        "clip_g": meta(lambda: CLIPTextModelWithProjection(clip_g)),
    }


# ---- the run and the estimate -------------------------------------------------------------------------------------

MODELS = {
    "sd3.5-medium": dict(
        config=SD35_MEDIUM_CONFIG, blocks={"sd3_dual": 13, "sd3": 11}, text_encoders=("t5_xxl", "clip_l", "clip_g")
    ),
    "flux-dev": dict(
        config=FLUX_DEV_CONFIG, blocks={"flux_double": 19, "flux_single": 38}, text_encoders=("t5_xxl", "clip_l")
    ),
}
GB = 1e9
CUDA_OVERHEAD_GB = 1.0  # an ASSUMPTION (CUDA context, cuBLAS workspace), not measured here
HEADROOM = 0.9  # an ASSUMPTION: the allocator's fragmentation and backward's transient gradients


def jobs(resolutions, precisions) -> list[tuple]:
    """Every measurement, most important first: bf16 blocks, the loss's decoders and CLIP, then fp32 blocks."""

    def blocks(precision):
        kinds = [(model, kind) for model in MODELS for kind in MODELS[model]["blocks"]]
        return [("block", model, kind, res, precision) for res in resolutions for model, kind in kinds]

    out = blocks("bf16") if "bf16" in precisions else []
    out += [("decoder", kind, res, "bf16") for kind in ("tiny", "kl", "kl_ckpt") for res in (256, 512)]
    out += [("clip", "bf16"), ("clip", "fp32"), ("decoder", "kl", 256, "fp32")]
    return out + (blocks("fp32") if "fp32" in precisions else [])


def run_job(job: tuple) -> dict:
    if job[0] == "block":
        _, model, kind, res, precision = job
        config = MODELS[model]["config"]
        heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
        n_text = TEXT_TOKENS[model]
        return dict(measure_block(kind, heads * head_dim, heads, head_dim, image_tokens(res), n_text, precision,
                                  axes=config.get("axes_dims_rope")), model=model, resolution=res)  # fmt: skip
    if job[0] == "decoder":
        return measure_decoder(job[1], job[2], job[3])
    return measure_clip(job[1])


def _decoder_bytes(results: dict, kind: str, res: int) -> float:
    """The decoder's saved bytes at ``res``, scaled by the pixel count from the largest measured size if needed."""
    measured = {r["resolution"]: r["saved_bytes"] for r in results.values()
                if r.get("kind") == kind and "decoder_params" in r and r["precision"] == "bf16"}  # fmt: skip
    if res in measured:
        return measured[res]
    top = max(measured)
    return measured[top] * (res / top) ** 2


def estimate_rows(results: dict, counts: dict, batch: int = 1) -> list[dict]:
    """The ESTIMATE per model and resolution, in GB (1e9 bytes), from the bf16 measurements at batch 1: weights and
    optimizer state as counted, every activation term times ``batch`` (derived: all of them are per image)."""
    rows = []
    clip = next(
        r for r in results.values() if "decoder_params" not in r and "kind" not in r and r["precision"] == "bf16"
    )
    clip_gb = (2 * counts["clip_b16"] + batch * clip["saved_bytes"]) / GB
    for model, spec in MODELS.items():
        for res in RESOLUTIONS:
            per = {k: results.get(f"block/{model}/{k}/{res}/bf16") for k in spec["blocks"]}
            if any(v is None for v in per.values()):
                continue
            lora = sum(n * per[k]["lora_params"] for k, n in spec["blocks"].items())
            act_full = batch * sum(n * per[k]["saved_bytes"] for k, n in spec["blocks"].items()) / GB
            act_ckpt = batch * (sum(n * per[k]["input_bytes"] for k, n in spec["blocks"].items())
                                + max(v["saved_bytes"] for v in per.values())) / GB  # fmt: skip
            vae_w, tae_w = 2 * counts["vae"] / GB, 2 * counts["tae"] / GB
            decoder = {kind: batch * _decoder_bytes(results, kind, res) / GB for kind in ("kl", "kl_ckpt", "tiny")}
            row = dict(model=model, resolution=res, batch=batch, weights=2 * counts[f"{model}_with_buffers"] / GB,
                       lora_params=lora, lora_adam=16 * lora / GB, lora_adam8=10 * lora / GB, act_full=act_full,
                       act_ckpt=act_ckpt, vae=vae_w + decoder["kl"], vae_ckpt=vae_w + decoder["kl_ckpt"],
                       tae=tae_w + decoder["tiny"], clip=clip_gb,
                       text_encoders=2 * sum(counts[name] for name in spec["text_encoders"]) / GB)  # fmt: skip
            base = row["weights"] + row["clip"]
            row["A"] = base + row["lora_adam"] + act_full + row["vae"]
            row["B"] = base + row["lora_adam"] + act_ckpt + row["vae"]
            row["C"] = base + row["lora_adam"] + act_ckpt + row["vae_ckpt"]
            row["D"] = base + row["lora_adam"] + act_ckpt + row["tae"]
            row["E"] = base + row["lora_adam8"] + act_ckpt + row["tae"]
            row["E+text"] = row["E"] + row["text_encoders"]
            rows.append(row)
    return rows


SETTINGS = {
    "A": "bf16 base, fp32 LoRA + Adam, no checkpointing, full VAE decoder",
    "B": "A + gradient checkpointing on the transformer",
    "C": "B + decoder checkpointing (decoder_gradient_checkpointing=True)",
    "D": "B + TAESD3 / TAEF1 as loss_vae (instead of the full decoder)",
    "E": "D + 8-bit Adam (bitsandbytes)",
    "E+text": "E with the text encoders kept on the GPU in bf16 (no offloading)",
}


def fits(total_gb: float) -> str:
    """The smallest GPU of 24 / 80 GB the total fits in, with `CUDA_OVERHEAD_GB` and `HEADROOM` (assumptions)."""
    for size in (24, 80):
        if total_gb + CUDA_OVERHEAD_GB <= HEADROOM * size:
            return f"{size} GB"
    return "> 80 GB"


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def print_tables(results: dict, counts: dict) -> list[dict]:
    """Prints the measured rows, the parameter counts and the ESTIMATE; returns the estimate's rows."""
    mb = lambda n: f"{n / 1e6:,.1f}"  # noqa: E731
    print("\n## Measured per block (batch 1, rank-16 LoRA, one forward + backward on the CPU)\n")
    print(
        _row(
            "model", "block", "px", "tokens", "precision", "block params", "LoRA params", "saved MB", "inputs MB", "s"
        )
    )
    print(_row(*["---"] * 10))
    for r in results.values():
        if "block_params" in r:
            tokens = f"{r['n_image']} + {r['n_text']}"
            print(_row(r["model"], r["kind"], r["resolution"], tokens, r["precision"], f"{r['block_params']:,}",
                       f"{r['lora_params']:,}", mb(r["saved_bytes"]), mb(r["input_bytes"]), r["seconds"]))  # fmt: skip
    print("\n## Measured: the loss's decoders and CLIP (gradients into their input, weights frozen)\n")
    print(_row("part", "px", "precision", "params", "saved MB", "s") + "\n" + _row(*["---"] * 6))
    for r in results.values():
        if "decoder_params" in r:
            name = {"kl": "AutoencoderKL (SD3/Flux VAE)", "kl_ckpt": "AutoencoderKL, checkpointed",
                    "tiny": "AutoencoderTiny (TAESD3/TAEF1)"}[r["kind"]]  # fmt: skip
            print(_row(name + " decode", r["resolution"], r["precision"], f"{r['params']:,}", mb(r["saved_bytes"]),
                       r["seconds"]))  # fmt: skip
        elif "kind" not in r:
            print(_row("CLIP ViT-B/16 image features", 224, r["precision"], f"{r['params']:,}", mb(r["saved_bytes"]),
                       r["seconds"]))  # fmt: skip
    print("\n## Parameter counts (meta device)\n")
    for name, n in counts.items():
        print(f"- {name}: {n:,}")
    rows = estimate_rows(results, counts)
    print("\n## ESTIMATE: the parts, GB (1e9 B), batch 1, bf16 measurements; text encoders offloaded\n")
    print(_row("model", "px", "weights bf16", "LoRA params", "LoRA+grad+Adam (8-bit)", "activations (ckpt)",
               "VAE decode (ckpt; TAE)", "CLIP")  # fmt: skip
          + "\n" + _row(*["---"] * 8))  # fmt: skip
    for r in rows:
        print(_row(r["model"], r["resolution"], f"{r['weights']:.2f}", f"{r['lora_params']:,}",
                   f"{r['lora_adam']:.3f} ({r['lora_adam8']:.3f})", f"{r['act_full']:.2f} ({r['act_ckpt']:.2f})",
                   f"{r['vae']:.2f} ({r['vae_ckpt']:.2f}; {r['tae']:.2f})", f"{r['clip']:.2f}"))  # fmt: skip
    print("\n## ESTIMATE: totals, GB, and the smallest of a 24 / 80 GB GPU it fits\n")
    print(_row("model", "px", "batch", *SETTINGS) + "\n" + _row(*["---"] * (3 + len(SETTINGS))))
    for r in rows + estimate_rows(results, counts, batch=4):
        print(_row(r["model"], r["resolution"], r["batch"], *(f"{r[s]:.1f} ({fits(r[s])})" for s in SETTINGS)))
    for key, text in SETTINGS.items():
        print(f"- {key}: {text}")
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="build/flow_memory.json", help="results, kept between runs (resumable)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=list(RESOLUTIONS))
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--estimate-only", action="store_true", help="print the tables from --json, measure nothing")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results = json.load(open(args.json)) if os.path.exists(args.json) else {}
    for job in [] if args.estimate_only else jobs(args.resolutions, args.precisions):
        key = "/".join(str(x) for x in job)
        if key in results:
            continue
        results[key] = run_job(job)
        print(key, results[key], flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    counts = parameter_counts()
    return {"results": results, "counts": counts, "rows": print_tables(results, counts)}


if __name__ == "__main__":
    main()

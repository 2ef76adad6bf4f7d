"""Fine-tuning step time and peak memory on SDXL's real UNet / VAE configs, side by side with SD 1.5 (issue 30).

Random weights in the real configs (written out below, with where each value comes from), at ``--resolution``
(latents at 1/8), fp32 on the CPU; one process per configuration, so each peak RSS is its own. Each configuration
runs ``pipe.finetune`` with the default scheme ``"efficient"``, batch 1, rank-4 LoRA on the family's default targets
(`families/base.py`): per generation step one UNet forward with the LoRA, the x0 estimate, a decode of x0_hat with
gradients (the full VAE decoder, the same decoder checkpointed, or TAESD / TAESDXL as ``loss_vae``), the CLIP loss
and a backward into the LoRA only, then the optimizer step. The CLIP of the loss is a ViT-B/16-sized `CLIPModel`
(random weights; one view per loss, ``clip_num_augmentations=0``, the official setting). The text encoders are not
part of a step (the conditioning is encoded once per call, without gradients), so each text encoder is a stand-in
with the real hidden widths (768; 1280 + a 1280 projection for SDXL's second) and 77 tokens but 2 small layers:
the UNet sees conditioning of the real shapes (SDXL: encoder_hidden_states (B, 77, 2048), text_embeds (B, 1280),
time_ids (B, 6)); the real text encoders' parameter counts are reported from their configs.

    OMP_NUM_THREADS=1 python benchmarks/bench_sdxl.py --resolution 256 --json build/bench_sdxl.json
    python benchmarks/bench_sdxl.py --tiny                     # smoke run at toy size (tests/test_bench_sdxl.py)

Also reported: UNet calls per edited image (counted with a forward hook on toy-size models of the same families:
the count does not depend on the size), FLOPs per UNet call and per fine-tuning step at 1024 px (SD 1.5 at 512 px)
from `torch.utils.flop_counter.FlopCounterMode` on the meta device, and an ESTIMATE of the 1024 px bf16 memory of
a fine-tuning step from the measured rows (see `estimate_1024`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# SD 1.5: as benchmarks/bench_latent.py (stable-diffusion-v1-5's unet / vae config.json)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)  # fmt: skip
# SDXL base 1.0's UNet. Stability's sgm config (generative-models configs/inference/sd_xl_base.yaml): model_channels
# 320, channel_mult [1, 2, 4], num_res_blocks 2, attention_resolutions [4, 2] (no attention in the first block),
# transformer_depth [1, 2, 10], num_head_channels 64, use_linear_in_transformer, context_dim 2048, adm_in_channels
# 2816. diffusers' conversion of it (loaders/single_file_utils.py, create_unet_diffusers_config_from_ldm, 0.42.1):
# attention_head_dim = 320 / 64 x channel_mult = (5, 10, 20); context_dim 2048 -> addition_embed_type "text_time"
# with addition_time_embed_dim 256; projection_class_embeddings_input_dim = adm_in_channels = 6 x 256 + 1280.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)  # fmt: skip
# SD's KL-f8 VAE; SDXL's is the same architecture ("the same autoencoder architecture", stabilityai/sdxl-vae's card)
# with scaling_factor 0.13025 (sgm's sd_xl_base.yaml scale_factor; diffusers utils/remote_utils.py) and
# force_upcast True (AutoencoderKL's default; the fp16 overflow madebyollin/sdxl-vae-fp16-fix's card describes).
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    norm_num_groups=32,
)  # fmt: skip
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
# TAESD and TAESDXL are both `AutoencoderTiny`'s default config (latent_channels 4, scaling_factor 1.0); they differ
# in their weights only (diffusers docs/source/en/api/models/autoencoder_tiny.md loads madebyollin/taesdxl that way)
# The real text encoders, for their parameter counts only: CLIP ViT-L/14's text tower (SD 1.5 and SDXL's first) and
# OpenCLIP ViT-bigG/14's (SDXL's second, CLIPTextModelWithProjection, projection 1280)
TEXT_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")  # fmt: skip
TEXT_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                 projection_dim=1280)  # fmt: skip
# the loss's CLIP at openai/clip-vit-base-patch16's size (its text tower's vocabulary is the stand-in tokenizer's)
CLIP_B16_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=16)  # fmt: skip
CLIP_B16_TEXT = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                     max_position_embeddings=77)  # fmt: skip

CONFIGS = (
    "SD 1.5, full VAE decoder", "SD 1.5, checkpointed decoder", "SD 1.5, TAESD decoder",
    "SDXL, full VAE decoder", "SDXL, checkpointed decoder", "SDXL, TAESDXL decoder",
)  # fmt: skip
RECOMMENDED_EDIT = dict(t0=500, num_inversion_steps=40, num_inference_steps=40)  # testbed.RECOMMENDED_EDIT_LATENT
FAST_EDIT = dict(t0=500, encoding="noise", num_inference_steps=6)  # testbed.FAST_EDIT's encoding and steps
GPU_CLASSES_GB = (24, 40, 80)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _shrunk(config: dict, tiny: bool) -> dict:
    """Toy size: channels / 8, 4 groups, one layer per block, small added conditioning."""
    if not tiny:
        return dict(config)
    out = dict(config, block_out_channels=tuple(c // 8 for c in config["block_out_channels"]), norm_num_groups=4,
               layers_per_block=1)  # fmt: skip
    if "transformer_layers_per_block" in config:
        out.update(transformer_layers_per_block=(1, 1, 1), cross_attention_dim=64, addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=6 * 8 + 32)  # fmt: skip
    elif "cross_attention_dim" in config:
        out.update(cross_attention_dim=32)
    return out


def _tokenizer(length: int = 77):
    from transformers import CLIPTokenizer

    from diffusionclip_pipeline.testbed import WEIGHTS_DIR

    # the test-bed's small vocabulary, padded to the real 77 tokens (16 for the test-bed's own tiny CLIP)
    return CLIPTokenizer.from_pretrained(os.path.join(WEIGHTS_DIR, "tokenizer"), model_max_length=length)


def _text_encoder(tokenizer, width: int, projection: int | None, tiny: bool):
    """A stand-in text encoder: the real output width (or 32 at toy size), 2 small layers."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    eos = tokenizer.eos_token_id
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32 if tiny else width, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
        pad_token_id=eos, projection_dim=32 if tiny else (projection or 512),
    )  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _loss_clip(tokenizer, tiny: bool):
    from transformers import CLIPConfig, CLIPModel

    from diffusionclip_pipeline.testbed import WEIGHTS_DIR

    if tiny:
        return CLIPModel.from_pretrained(os.path.join(WEIGHTS_DIR, "clip")).eval()
    text = dict(CLIP_B16_TEXT, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    return CLIPModel(CLIPConfig(text_config=text, vision_config=CLIP_B16_VISION, projection_dim=512)).eval()


def build(name: str, resolution: int, tiny: bool):
    """The pipeline of configuration ``name`` (random weights, seed 0) and its ``loss_vae`` (`None`: the VAE)."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, DDPMScheduler, UNet2DConditionModel

    from diffusionclip_pipeline import DiffusionCLIPPipeline

    torch.manual_seed(0)
    xl = name.startswith("SDXL")
    tokenizer = _tokenizer()
    unet = UNet2DConditionModel(**_shrunk(SDXL_UNET if xl else SD15_UNET, tiny)).eval()
    unet.register_to_config(sample_size=resolution // 8)
    vae = AutoencoderKL(**_shrunk(SDXL_VAE if xl else SD15_VAE, tiny)).eval()
    text = dict(text_encoder=_text_encoder(tokenizer, 768, None, tiny), tokenizer=tokenizer)
    if xl:
        text.update(text_encoder_2=_text_encoder(tokenizer, 1280, 1280, tiny), tokenizer_2=tokenizer)
    pipe = DiffusionCLIPPipeline(
        unet=unet, scheduler=DDPMScheduler(beta_schedule="scaled_linear"), vae=vae,
        clip_model=_loss_clip(tokenizer, tiny), clip_tokenizer=_tokenizer(16) if tiny else tokenizer, **text,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    loss_vae = None
    if "TAESD" in name:
        tiny_channels = dict(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4) if tiny else {}
        loss_vae = AutoencoderTiny(**tiny_channels).eval()
    return pipe, loss_vae


def _num_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def worker(name: str, resolution: int, tiny: bool, steps: int) -> dict:
    """One configuration: ``steps + 1`` optimizer steps of the efficient scheme (the first one warms up), and one
    no-grad UNet call with the adapter on (the unit of an edit's cost)."""
    import torch
    from bench_latent import time_finetune_steps

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    pipe, loss_vae = build(name, resolution, tiny)
    models_mb = rss_mb()
    image = torch.rand(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    step_s, finetune_s, steps_timed = time_finetune_steps(pipe, loss_vae, name, image, steps)
    call_s = None
    if "full" in name:  # the edit does not depend on the loss's decoder: time one UNet call in one row per model
        condition = pipe.family.encode_prompt(None, 1)
        latents = torch.randn(1, 4, resolution // 8, resolution // 8)
        with torch.no_grad():
            start = time.perf_counter()
            pipe.family.predict(pipe.unet, latents, 500, condition)
            call_s = time.perf_counter() - start
    lora = sum(p.numel() for n, p in pipe.unet.named_parameters() if "lora_" in n)
    return {"name": name, "resolution": resolution, "step_s": step_s, "steps_timed": steps_timed,
            "finetune_s": finetune_s, "peak_mb": rss_mb(), "models_mb": models_mb,
            "unet_params": _num_params(pipe.unet) - lora, "lora_params": lora, "vae_params": _num_params(pipe.vae),
            "loss_vae_params": _num_params(loss_vae) if loss_vae is not None else 0,
            "clip_params": _num_params(pipe.clip_model), "unet_call_s": call_s}  # fmt: skip


def count_edit_calls() -> dict:
    """UNet calls per edited image for the recommended and the fast edit, hook-counted on toy-size SD 1.5 and SDXL
    pipelines with a LoRA adapter (one tiny fine-tuning step first)."""
    import torch

    counts = {}
    for family, name in (("SD 1.5", CONFIGS[0]), ("SDXL", CONFIGS[3])):
        pipe, _ = build(name, 32, tiny=True)
        image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        pipe.finetune("red circle", "blue circle", images=image[:1], t0=500, num_inversion_steps=2,
                      num_train_steps=1, num_epochs=1, batch_size=1, clip_num_augmentations=0)  # fmt: skip
        calls = []
        pipe.unet.register_forward_hook(lambda module, args, out, calls=calls: calls.append(args[0].shape[0]))
        for edit, settings in (("recommended", RECOMMENDED_EDIT), ("fast", FAST_EDIT)):
            calls.clear()
            extra = {"generator": torch.Generator().manual_seed(0)} if settings.get("encoding") == "noise" else {}
            pipe.edit(image, output_type="pt", **settings, **extra)
            counts[(family, edit)] = sum(calls) / len(image)
    return {f"{family}|{edit}": n for (family, edit), n in counts.items()}


def count_flops(tiny: bool) -> dict:
    """FLOPs (FlopCounterMode, meta device, batch 1) of one UNet call forward and forward + backward into the input
    (the frozen base's share of a LoRA step), of a decode forward and forward + backward, and of the loss's CLIP
    image tower; SDXL at 1024 px, SD 1.5 at 512 px (its native size) and 1024 px."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    def flops(module, make_inputs, backward):
        module.requires_grad_(False)
        with FlopCounterMode(display=False) as counter:
            inputs = make_inputs()
            out = module(*inputs[0], **inputs[1])
            out = out.sample if hasattr(out, "sample") else out[0]
            if backward:
                out.float().sum().backward()
        return counter.get_total_flops()

    sizes = (64, 32) if tiny else (1024, 512)
    out = {}
    with torch.device("meta"):
        for family, config, side in (("SDXL", SDXL_UNET, sizes[0]), ("SD 1.5", SD15_UNET, sizes[1]),
                                     ("SD 1.5", SD15_UNET, sizes[0])):  # fmt: skip
            unet = UNet2DConditionModel(**_shrunk(config, tiny))
            width, s = unet.config.cross_attention_dim, side // 8

            def unet_inputs(s=s, width=width, config=unet.config, xl=family == "SDXL"):
                x = torch.randn(1, 4, s, s, requires_grad=True)
                kwargs = dict(encoder_hidden_states=torch.randn(1, 77, width))
                if xl:
                    embeds = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
                    kwargs["added_cond_kwargs"] = dict(text_embeds=torch.randn(1, embeds), time_ids=torch.randn(1, 6))
                return (x, torch.tensor(500)), kwargs

            for backward in (False, True):
                out[f"{family} UNet|{side}|{'fwd+bwd' if backward else 'fwd'}"] = flops(unet, unet_inputs, backward)
        vae = AutoencoderKL(**_shrunk(SD15_VAE, tiny))
        taesd = AutoencoderTiny()
        for name, decoder, side in (("VAE decoder", vae.decode, sizes[0]), ("TAESD(XL) decoder", taesd.decode,
                                                                             sizes[0])):  # fmt: skip
            s = side // 8
            for backward in (False, True):
                module = decoder.__self__
                module.requires_grad_(False)
                with FlopCounterMode(display=False) as counter:
                    z = torch.randn(1, 4, s, s, requires_grad=True)
                    y = decoder(z).sample
                    if backward:
                        y.sum().backward()
                out[f"{name}|{side}|{'fwd+bwd' if backward else 'fwd'}"] = counter.get_total_flops()
        clip = dict(CLIP_B16_VISION, num_hidden_layers=1) if tiny else CLIP_B16_VISION
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**clip, projection_dim=512))
        for backward in (False, True):
            out[f"CLIP ViT-B/16 image|224|{'fwd+bwd' if backward else 'fwd'}"] = flops(
                vision, lambda: ((torch.randn(1, 3, 224, 224, requires_grad=True),), {}), backward
            )
    return out


def text_encoder_params() -> dict:
    """Parameters of the real text encoders (built on the meta device from their configs)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        large = _num_params(CLIPTextModel(CLIPTextConfig(**TEXT_L)))
        bigg = _num_params(CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_BIGG)))
    return {"SD 1.5": large, "SDXL": large + bigg}


def estimate_1024(row: dict, text_params: int) -> dict:
    """ESTIMATE of a 1024 px fine-tuning step's memory in bf16 (GB), from a row measured in fp32 at
    ``row["resolution"]``. Assumptions: weights 2 bytes per parameter (UNet, VAE, TAESD(XL), the loss's CLIP; a
    bf16 SDXL VAE is not upcast: diffusers and this package upcast only fp16); the LoRA in fp32 with its gradient
    and two Adam moments (16 bytes per parameter); the measured training memory (peak RSS minus the models' RSS)
    grows with the pixel count and halves in bf16 ("low"), or does not halve ("high": e.g. activations autocast
    keeps in fp32); the text encoders (``text_params``, 2 bytes each) resident or freed after the conditioning is
    encoded (it is encoded once per call); 1 GB for the CUDA context and allocator slack."""
    scale = (1024 / row["resolution"]) ** 2
    weights = (row["unet_params"] + row["vae_params"] + row["loss_vae_params"] + row["clip_params"]) * 2 / 1e9
    lora = row["lora_params"] * 16 / 1e9
    training = max(row["peak_mb"] - row["models_mb"], 0.0) * 1024**2 * scale / 1e9
    base = weights + lora + 1.0
    est = {"weights_gb": weights, "lora_gb": lora, "activations_low_gb": training / 2, "activations_high_gb": training,
           "text_encoders_gb": text_params * 2 / 1e9}  # fmt: skip
    est["total_low_gb"] = base + training / 2
    est["total_high_gb"] = base + training + est["text_encoders_gb"]
    est["fits"] = {gb: ("yes" if est["total_high_gb"] <= gb else "likely" if est["total_low_gb"] <= gb else "no")
                   for gb in GPU_CLASSES_GB}  # fmt: skip
    return est


def _run_rows(args) -> list[dict]:
    rows = []
    for name in args.configs:
        if args.tiny:  # toy size: in this process (its RSS is not the row's own)
            rows.append(worker(name, args.resolution, True, args.steps))
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--only", name, "--resolution", str(args.resolution),
               "--steps", str(args.steps)]  # fmt: skip
        start = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            rows.append({"name": name, "resolution": args.resolution,
                         "error": (result.stderr.strip().splitlines() or ["?"])[-1][:100]})  # fmt: skip
        else:
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(f"  done {name} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return rows


def _print_tables(rows, calls, flops, text_params, args) -> None:
    base = {fam: next((r for r in rows if r["name"] == f"{fam}, full VAE decoder" and "step_s" in r), None)
            for fam in ("SD 1.5", "SDXL")}  # fmt: skip
    threads = os.environ.get("BENCH_THREADS", "1")
    size = "toy size" if args.tiny else "real configs, random weights"
    print(f"\nFine-tuning step (scheme efficient, batch 1, rank-4 LoRA) at {args.resolution} px ({size}, fp32, CPU, "
          f"{threads} thread(s))\n")  # fmt: skip
    print("| configuration | UNet params | LoRA params | s / step | vs full decoder | peak RSS MB | models MB | "
          "training MB | no-grad UNet call s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | | | failed: {r['error']} | | | | | |")
            continue
        ref = base[r["name"].split(",")[0]]
        ratio = f"{r['step_s'] / ref['step_s']:.2f}x" if ref else "-"
        call = f"{r['unet_call_s']:.2f}" if r["unet_call_s"] is not None else ""
        training = r["peak_mb"] - r["models_mb"]
        print(f"| {r['name']} | {r['unet_params']:,} | {r['lora_params']:,} | {r['step_s']:.2f} | {ratio} | "
              f"{r['peak_mb']:.0f} | {r['models_mb']:.0f} | {training:.0f} | {call} |")  # fmt: skip
    print("\nUNet calls per edited image (hook-counted on toy-size models; the count does not depend on the size)\n")
    print("| model | recommended edit (t0 500, 40 + 40) | fast edit (noise encoding + 6 steps) |")
    print("|---|---|---|")
    for family in ("SD 1.5", "SDXL"):
        print(f"| {family} | {calls[f'{family}|recommended']:.0f} | {calls[f'{family}|fast']:.0f} |")
    print("\nFLOPs (FlopCounterMode on the meta device, batch 1)\n")
    print("| component | px | forward TFLOP | forward + backward TFLOP |")
    print("|---|---|---|---|")
    for key in sorted({k.rsplit("|", 1)[0] for k in flops}, key=lambda k: (k.split("|")[0], int(k.split("|")[1]))):
        name, side = key.split("|")
        print(f"| {name} | {side} | {flops[key + '|fwd'] / 1e12:.3f} | {flops[key + '|fwd+bwd'] / 1e12:.3f} |")
    if args.tiny:
        return
    print("\n1024 px, bf16: ESTIMATE from the rows above (assumptions: estimate_1024's docstring)\n")
    print("| configuration | weights GB | training GB (low-high) | total GB (low-high) | "
          + " | ".join(f"{gb} GB" for gb in GPU_CLASSES_GB) + " |")  # fmt: skip
    print("|---|---|---|---|" + "---|" * len(GPU_CLASSES_GB))
    for r in rows:
        if "error" in r or not r["name"].startswith("SDXL"):
            continue
        e = estimate_1024(r, text_params["SDXL"])
        print(f"| {r['name']} | {e['weights_gb']:.1f} | {e['activations_low_gb']:.1f}-{e['activations_high_gb']:.1f} "
              f"| {e['total_low_gb']:.1f}-{e['total_high_gb']:.1f} | "
              + " | ".join(e["fits"][gb] for gb in GPU_CLASSES_GB) + " |")  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default 256; 32 with --tiny)")
    parser.add_argument("--steps", type=int, default=1, help="timed optimizer steps per configuration (+1 warm-up)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS, metavar="NAME")
    parser.add_argument("--tiny", action="store_true", help="toy-size models, all in this process (a smoke run)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--only", default=None, help="run one configuration in this process (internal)")
    args = parser.parse_args(argv)
    args.resolution = args.resolution or (32 if args.tiny else 256)
    if args.only is not None:
        print(json.dumps(worker(args.only, args.resolution, args.tiny, args.steps)))
        return {}
    rows = _run_rows(args)
    calls, flops, text_params = count_edit_calls(), count_flops(args.tiny), text_encoder_params()
    _print_tables(rows, calls, flops, text_params, args)
    estimates = {r["name"]: estimate_1024(r, text_params[r["name"].split(",")[0]]) for r in rows if "step_s" in r}
    result = {"resolution": args.resolution, "tiny": args.tiny, "threads": os.environ.get("BENCH_THREADS", "1"),
              "rows": rows, "edit_unet_calls": calls, "flops": flops, "text_encoder_params": text_params,
              "estimate_1024_bf16": estimates}  # fmt: skip
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return result


if __name__ == "__main__":
    main()

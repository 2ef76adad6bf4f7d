"""benchmarks/bench_flow_memory.py (issue 31, "Memory"): the saved-tensor count is exact on known graphs, the
toy-width blocks carry the LoRA the package targets, the transcribed real configs are accepted by the installed
diffusers classes, and the estimate adds up its parts."""

import os

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import bench_flow_memory

    return bench_flow_memory


def test_saved_tensor_bytes_counts_each_storage_once_and_leaves_out_parameters(bench):
    x = torch.randn(10, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(3, 10), requires_grad=False)
    with bench.saved_tensor_bytes() as once:
        (x * x).sum()  # saves x twice: one storage
    with bench.saved_tensor_bytes() as two:
        (x.exp() + x * x).sum()  # exp saves its result, a second storage
    with bench.saved_tensor_bytes([weight.untyped_storage().data_ptr()]) as frozen:
        (x @ weight.t()).sum()  # only the weight is needed for x's gradient, and it is excluded
    assert once["bytes"] == 40 and once["tensors"] == 2 and once["by_dtype"] == {"float32": 40}
    assert two["bytes"] == 80
    assert frozen["bytes"] == 0 and frozen["tensors"] == 1


@pytest.mark.parametrize("kind,modules", [("sd3", 4), ("sd3_dual", 8), ("flux_double", 4), ("flux_single", 3)])
def test_measure_block_toy_width(bench, kind, modules):
    dim, rank, n_image, n_text = 32, 4, 16, 8
    axes = (4, 6, 6) if kind.startswith("flux") else None
    fp32 = bench.measure_block(kind, dim, 2, 16, n_image, n_text, "fp32", rank=rank, axes=axes)
    bf16 = bench.measure_block(kind, dim, 2, 16, n_image, n_text, "bf16", rank=rank, axes=axes)
    # to_q / to_k / to_v / to_out.0 are dim x dim (Flux's single block has no to_out; SD3.5's dual block two attns)
    assert fp32["lora_params"] == bf16["lora_params"] == modules * rank * (dim + dim)
    assert fp32["input_bytes"] == (n_image + n_text + 1) * dim * 4
    assert bf16["input_bytes"] * 2 == fp32["input_bytes"]
    assert sum(fp32["saved_by_dtype"].values()) == fp32["saved_bytes"] and "bfloat16" in bf16["saved_by_dtype"]
    assert fp32["saved_bytes"] > fp32["input_bytes"] and bf16["saved_bytes"] > 0
    assert fp32["block_params"] == sum(p.numel() for p in bench.build_block(kind, dim, 2, 16).parameters())


def test_errors(bench):
    with pytest.raises(ValueError, match="`precision`"):
        bench.measure_block("sd3", 32, 2, 16, 4, 4, "fp16")
    with pytest.raises(ValueError, match="`kind`"):
        bench.build_block("unet", 32, 2, 16)
    with pytest.raises(ValueError, match="`kind`"):
        bench.measure_decoder("kl3", 64)
    with pytest.raises(ValueError, match="`precision`"):
        bench.measure_decoder("kl", 64, "fp16")
    from diffusers import FluxTransformer2DModel

    with pytest.raises(ValueError, match="num_blocks"):
        bench.check_config(FluxTransformer2DModel, {"num_blocks": 3})


def test_transcribed_configs_match_the_installed_classes(bench):
    from diffusers import AutoencoderKL, AutoencoderTiny, FluxTransformer2DModel, SD3Transformer2DModel

    bench.check_config(SD3Transformer2DModel, bench.SD35_MEDIUM_CONFIG)
    bench.check_config(FluxTransformer2DModel, bench.FLUX_DEV_CONFIG)
    bench.check_config(AutoencoderKL, bench.FLOW_VAE_CONFIG)
    bench.check_config(AutoencoderTiny, bench.TAE_FLOW_CONFIG)
    assert [bench.image_tokens(r) for r in (512, 1024)] == [1024, 4096]


def test_estimate_adds_up_its_parts(bench):
    counts = {"clip_b16": 10, "vae": 20, "tae": 5, "sd3.5-medium_with_buffers": 1000, "t5_xxl": 1, "clip_l": 2}
    results = {}
    counts["clip_g"] = 4
    for i, kind in enumerate(("sd3_dual", "sd3")):
        for res in (512, 1024):
            results[f"block/sd3.5-medium/{kind}/{res}/bf16"] = dict(
                kind=kind, model="sd3.5-medium", resolution=res, saved_bytes=100 * (i + 1) * res,
                input_bytes=7 * res, lora_params=3 * (i + 1), block_params=0, precision="bf16",
            )  # fmt: skip
    results["decoder/kl/512/bf16"] = dict(
        kind="kl", resolution=512, saved_bytes=400, decoder_params=1, precision="bf16"
    )
    results["decoder/kl_ckpt/512/bf16"] = dict(
        kind="kl_ckpt", resolution=512, saved_bytes=100, decoder_params=1, precision="bf16"
    )
    results["decoder/tiny/512/bf16"] = dict(
        kind="tiny", resolution=512, saved_bytes=40, decoder_params=1, precision="bf16"
    )
    results["clip/bf16"] = dict(precision="bf16", saved_bytes=30, params=10)
    rows = bench.estimate_rows(results, counts)
    assert [(r["model"], r["resolution"]) for r in rows] == [("sd3.5-medium", 512), ("sd3.5-medium", 1024)]
    r = rows[1]  # 1024 px: 13 dual + 11 plain blocks; the decoders scaled by the pixel count from 512 px
    gb = 1e9
    lora = 13 * 3 + 11 * 6
    act_full = (13 * 100 * 1024 + 11 * 200 * 1024) / gb
    act_ckpt = (24 * 7 * 1024 + 200 * 1024) / gb
    vae, vae_ckpt, tae, clip = (40 + 400 * 4) / gb, (40 + 100 * 4) / gb, (10 + 40 * 4) / gb, (20 + 30) / gb
    assert r["lora_params"] == lora
    assert r["A"] == pytest.approx(2000 / gb + clip + 16 * lora / gb + act_full + vae)
    assert r["B"] == pytest.approx(2000 / gb + clip + 16 * lora / gb + act_ckpt + vae)
    assert r["C"] == pytest.approx(2000 / gb + clip + 16 * lora / gb + act_ckpt + vae_ckpt)
    assert r["D"] == pytest.approx(2000 / gb + clip + 16 * lora / gb + act_ckpt + tae)
    assert r["E"] == pytest.approx(2000 / gb + clip + 10 * lora / gb + act_ckpt + tae)
    assert r["E+text"] == pytest.approx(r["E"] + 2 * (1 + 2 + 4) / gb)
    r2 = bench.estimate_rows(results, counts, batch=2)[1]  # activations per image: twice as many, weights once
    act2 = 2 * act_ckpt + (2 - 1) * (30 + 40 * 4) / gb
    assert r2["E"] == pytest.approx(2000 / gb + clip + 10 * lora / gb + act2 + tae)


def test_checkpointed_decoder_keeps_the_segment_inputs(bench):
    from diffusers import AutoencoderKL

    config = dict(bench.FLOW_VAE_CONFIG, block_out_channels=(32, 32, 32, 32))
    full = bench.measure_decoder("kl", 64, "fp32", config)
    ckpt = bench.measure_decoder("kl_ckpt", 64, "fp32", config)
    side = 64 // 8
    # the inputs of the mid block and the 4 up blocks (3 of them upsample 2x), 32 channels, float32
    assert ckpt["kept_inputs"] == 4 * 32 * side**2 * (1 + 1 + 4 + 16 + 64)
    assert ckpt["saved_bytes"] == ckpt["outside"] + ckpt["kept_inputs"] + ckpt["largest_segment"]
    assert ckpt["saved_bytes"] < full["saved_bytes"]
    assert ckpt["params"] == full["params"] == bench.meta_parameter_count(AutoencoderKL, config)

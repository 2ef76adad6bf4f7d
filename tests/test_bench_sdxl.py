"""benchmarks/bench_sdxl.py runs at toy size: its tables have their rows and columns, and an edit costs the UNet
calls docs/sdxl.md states (80 for the recommended 40 + 40 edit, 6 for the fast one). No timing is asserted."""

import os

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(autouse=True)
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)


def test_bench_sdxl_tiny(capsys, tmp_path):
    import bench_sdxl

    result = bench_sdxl.main(["--tiny", "--json", str(tmp_path / "bench.json")])
    out = capsys.readouterr().out
    rows = result["rows"]
    assert [r["name"] for r in rows] == list(bench_sdxl.CONFIGS)
    header = ("| configuration | UNet params | LoRA params | s / step | vs full decoder | peak RSS MB | models MB | "
              "training MB | no-grad UNet call s |")  # fmt: skip
    assert header in out and "failed" not in out
    for r in rows:
        assert f"| {r['name']} | {r['unet_params']:,} | {r['lora_params']:,} |" in out
        assert r["step_s"] > 0 and r["steps_timed"] == 1 and r["peak_mb"] >= r["models_mb"] > 0
        assert 0 < r["lora_params"] < r["unet_params"]
        assert (r["unet_call_s"] is not None) == ("full" in r["name"])
        assert (r["loss_vae_params"] > 0) == ("TAESD" in r["name"])
    # the recommended edit: 40 inversion + 40 generation calls; the fast edit: noise encoding (no call) + 6 steps
    assert result["edit_unet_calls"] == {"SD 1.5|recommended": 80, "SD 1.5|fast": 6, "SDXL|recommended": 80,
                                         "SDXL|fast": 6}  # fmt: skip
    assert "| SDXL | 80 | 6 |" in out and "| SD 1.5 | 80 | 6 |" in out
    # FLOPs of every component, forward and forward + backward; the backward adds work
    for key in ("SDXL UNet", "SD 1.5 UNet", "VAE decoder", "TAESD(XL) decoder", "CLIP ViT-B/16 image"):
        pairs = [(v, result["flops"][k[:-3] + "fwd+bwd"]) for k, v in result["flops"].items()
                 if k.startswith(key + "|") and k.endswith("|fwd")]  # fmt: skip
        assert pairs and all(0 < fwd < both for fwd, both in pairs)
    assert result["text_encoder_params"]["SDXL"] > result["text_encoder_params"]["SD 1.5"]
    assert set(result["estimate_1024_bf16"]) == set(bench_sdxl.CONFIGS)
    assert (tmp_path / "bench.json").exists()


def test_estimate_1024_arithmetic():
    import bench_sdxl

    row = dict(resolution=256, unet_params=10**9, vae_params=0, loss_vae_params=0, clip_params=0, lora_params=0,
               peak_mb=2048.0, models_mb=1024.0)  # fmt: skip
    e = bench_sdxl.estimate_1024(row, text_params=0)
    # 1 GB of training memory at 256 px -> x16 pixels at 1024 px, halved in bf16 for the low bound
    assert e["weights_gb"] == pytest.approx(2.0)
    assert e["activations_high_gb"] == pytest.approx(16 * 1024**3 / 1e9)
    assert e["activations_low_gb"] == pytest.approx(e["activations_high_gb"] / 2)
    assert e["total_low_gb"] == pytest.approx(2.0 + 1.0 + e["activations_low_gb"])
    assert e["fits"] == {24: "yes", 40: "yes", 80: "yes"}

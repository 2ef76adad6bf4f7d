"""Issue 34's benchmarks run at toy size: bench_overhead.py's table has its row and ratios, bench_time_to_quality.py
writes one resumable file per run with a line per epoch (counts of UNet forward + backward passes exact), and its
report and figure read them back. Their numbers live in docs/time-to-quality.md, not here."""

import json
import os

import PIL.Image
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")


@pytest.fixture(autouse=True)
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)


def test_bench_overhead_tiny(capsys):
    import bench_overhead

    (row,) = bench_overhead.main(["--tiny"])
    assert row["model"] == "tiny" and row["steps_timed"] == 3  # 2 epochs x 2 steps, the first not timed
    assert all(row[k] > 0 for k in ("step_s", "floor_s", "lora_s", "loss_s"))
    assert row["step_over_floor"] == row["step_s"] / row["floor_s"]
    assert row["rest_s"] == row["step_s"] - row["lora_s"] - row["loss_s"]
    assert "| tiny | 1 | 3 |" in capsys.readouterr().out


def test_bench_time_to_quality_tiny_runs_resumes_and_reports(tmp_path, capsys):
    import bench_time_to_quality as ttq

    (path,) = ttq.main(["--tiny", "--recipes", "one_step", "--out", str(tmp_path)])
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    epochs, meta = lines[:-1], lines[-1]
    assert [e["epoch"] for e in epochs] == [1, 2] and meta["final"] and meta["recipe"] == "one_step"
    # one-step: one forward + backward per image and epoch, no inversion (forward noise)
    assert [e["fwd_bwd_per_image"] for e in epochs] == [1, 2] and epochs[0]["inversion_fwd_per_image"] == 0
    assert all(0 <= e["success"] <= 1 and e["train_s"] > 0 for e in epochs)
    assert epochs[1]["train_s"] > epochs[0]["train_s"] and epochs[-1]["final_edit"] == "fast"
    assert set(epochs[0]["held_out"]) >= {"epoch", "s_dir", "mae"} and epochs[0]["training"]["epoch"] == 1
    mtime = os.path.getmtime(path)
    assert ttq.main(["--tiny", "--recipes", "one_step", "--out", str(tmp_path)]) == [path]  # done: skipped
    assert os.path.getmtime(path) == mtime
    assert os.path.basename(path) == "one_step-red-blue-circle-seed5.jsonl"  # pixel: the published names
    capsys.readouterr()
    figures = ttq.main(["--report", "--out", str(tmp_path), "--figure", str(tmp_path / "fig.png")])
    out = capsys.readouterr().out
    assert "| one_step | red:blue:circle | 5 | 2 |" in out and "#### Proxy agreement" in out
    assert "## latent test-bed" not in out and figures == [str(tmp_path / "fig.png")]
    assert PIL.Image.open(tmp_path / "fig.png").size == (1000, 360)


def test_bench_time_to_quality_latent_kind_has_its_own_files_tables_and_figure(tmp_path, capsys):
    import bench_time_to_quality as ttq

    (pixel,) = ttq.main(["--tiny", "--recipes", "one_step", "--out", str(tmp_path)])
    (latent,) = ttq.main(["--tiny", "--kind", "latent", "--recipes", "one_step", "--out", str(tmp_path)])
    assert os.path.basename(latent) == "one_step-red-blue-circle-seed5-latent.jsonl" and latent != pixel
    with open(latent) as f:
        lines = [json.loads(line) for line in f]
    epochs, meta = lines[:-1], lines[-1]
    assert meta["kind"] == "latent" and all(e["kind"] == "latent" for e in epochs)
    # the latent UNet (cross-attention, called by the latent family) is counted as the pixel one is
    assert [e["fwd_bwd_per_image"] for e in epochs] == [1, 2]
    # the latent test-bed's recommended edit (t0 500, 40 + 40) and the fast edit from that depth
    assert meta["published_edits"]["recommended"] == {"t0": 500, "num_inversion_steps": 40, "num_inference_steps": 40}
    assert meta["published_edits"]["fast"]["t0"] == 500 and "success_recommended" in epochs[-1]
    capsys.readouterr()
    figures = ttq.main(["--report", "--out", str(tmp_path), "--figure", str(tmp_path / "fig.png")])
    out = capsys.readouterr().out
    pixel_part, latent_part = out.split("## latent test-bed")
    assert "## pixel test-bed" in pixel_part and "| one_step | red:blue:circle | 5 | 2 |" in pixel_part
    assert "| one_step | red:blue:circle | 5 | 2 |" in latent_part  # one row each, each under its kind
    assert figures == [str(tmp_path / "fig.png"), str(tmp_path / "fig-latent.png")]
    assert PIL.Image.open(tmp_path / "fig-latent.png").size == (1000, 360)

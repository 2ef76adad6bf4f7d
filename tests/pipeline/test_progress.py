"""Progress in logs: where the bars show on a terminal only and stderr is not one, a line per 10 %, labelled."""

import io
import re

import pytest
from conftest import make_pipeline, random_images

from diffusionclip_pipeline.utils.logging import LogProgress


def test_log_progress_writes_a_line_per_ten_percent_and_at_the_end():
    out = io.StringIO()
    for _ in LogProgress(range(40), desc="fine-tuning", file=out):
        pass
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == [f"{p}%" for p in range(10, 101, 10)]
    assert lines[0].startswith("fine-tuning:  10% 4/40 [") and "left]" in lines[0]
    assert lines[-1].startswith("fine-tuning: 100% 40/40 [") and "left" not in lines[-1]


def test_log_progress_counts_updates_and_shows_the_postfix():
    out = io.StringIO()
    bar = LogProgress(total=3, desc="x", file=out)
    bar.set_postfix({"epoch": 0, "loss": "0.5"})
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert out.getvalue().splitlines()[-1].endswith("epoch=0 loss=0.5") and bar.n == 3
    assert len(out.getvalue().splitlines()) == 3  # 33 %, 66 %, 100 %: each crosses a 10 % mark; close adds nothing


@pytest.mark.parametrize("isatty, expect_lines", [(False, True), (True, False)])
def test_pipeline_bars_become_log_lines_only_off_a_terminal(monkeypatch, capsys, isatty, expect_lines):
    pipe = make_pipeline(with_clip=False)
    pipe.set_progress_bar_config(disable=None, desc="edit")  # on a terminal only, as the CLI and the demo set it
    monkeypatch.setattr("sys.stderr.isatty", lambda: isatty)
    pipe.edit(random_images(1), t0=100, num_inversion_steps=3, num_inference_steps=3, output_type="pt")
    err = capsys.readouterr().err
    log_lines = re.findall(r"^edit: (inversion|generation): 100% 3/3 \[", err, re.M)  # tqdm draws "100%|###|"
    assert (log_lines == ["inversion", "generation"]) is expect_lines, err

"""The web app (`diffusionclip_pipeline.commands.app`): its functions, and the app served in-process, driven by
gradio_client.

The app runs on the shipped test-bed with few steps (8 inversion / generation steps, 2 training steps, 1 epoch), so
the numbers say nothing about edit quality; the tests check what the app returns and that requests do not interfere.
Tests that need gradio skip without it (``pip install -e ".[app]"``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile

import numpy as np
import PIL.Image
import pytest
from conftest import free_port, served_client

from diffusionclip_pipeline import lora
from diffusionclip_pipeline.commands import app
from diffusionclip_pipeline.commands.main import build_parser
from diffusionclip_pipeline.model_card import CARD_NAME, GRID_NAME

pytestmark = pytest.mark.filterwarnings("ignore:Adapter .* was active which is now deleted")  # the cleanups

TINY_EDIT = dict(t0=400, num_inversion_steps=8, num_inference_steps=8)
TINY_FINETUNE = dict(num_train_steps=2, num_inversion_steps=8, num_fixed_point_iterations=0, clip_num_augmentations=1)


def pixels(image) -> np.ndarray:
    image = PIL.Image.open(image) if isinstance(image, (str, os.PathLike)) else image
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def state():
    """The test-bed app state with tiny settings and one fine-tuned adapter, ``blue``."""
    state = app.AppState.load("testbed")
    state.edit_defaults.update(TINY_EDIT)
    state.finetune_defaults.update(TINY_FINETUNE)
    images = app.example_images(state, "red circle", 2)
    state.pipe.finetune("red circle", "blue circle", images=images, num_epochs=1, adapter_name="blue",
                        **TINY_FINETUNE)  # fmt: skip
    return state


@pytest.fixture(scope="module")
def inputs(state, tmp_path_factory):
    """Two rendered test-bed images, also as files."""
    folder = tmp_path_factory.mktemp("inputs")
    images = app.example_images(state, "red circle", 2, seed=1)
    paths = [str(folder / f"{i}.png") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    return images, paths


@pytest.fixture(scope="module")
def client(state):
    """The app served on a free port of this machine, and a gradio_client for it."""
    yield from served_client(state)


# ---- the plain functions -------------------------------------------------------------------------------------------


def test_edit_images_strength_zero_is_the_reconstruction(state, inputs):
    images, _ = inputs
    full = app.edit_images(state, images, "blue", edit_strength=1.0)
    zero = app.edit_images(state, images, "blue", edit_strength=0.0)
    assert [im.size for im in full.before + full.after + full.reconstruction] == [(32, 32)] * 6
    for i in range(2):
        assert np.array_equal(pixels(zero.after[i]), pixels(zero.reconstruction[i]))
        assert np.array_equal(pixels(full.reconstruction[i]), pixels(zero.reconstruction[i]))
        assert np.abs(pixels(full.after[i]) - pixels(full.before[i])).max() > 0
        assert np.abs(pixels(full.after[i]) - pixels(full.reconstruction[i])).max() > 0
    strip = full.strips()[0]
    assert strip.width > 3 * 32 and strip.height > 32  # input | reconstruction | edit


def test_edit_images_without_adapter_reconstructs(state, inputs):
    result = app.edit_images(state, inputs[0][:1], None)
    assert np.array_equal(pixels(result.after[0]), pixels(result.reconstruction[0]))


def test_edit_images_errors(state, inputs):
    with pytest.raises(ValueError, match="Upload an image"):
        app.edit_images(state, [], "blue")
    with pytest.raises(ValueError, match="No adapter named 'nope'"):
        app.edit_images(state, inputs[0], "nope")
    with pytest.raises(ValueError, match="two different adapters"):
        app.edit_images(state, inputs[0], "blue", second_adapter="blue")


def test_export_load_round_trip_and_combination(state, inputs):
    """An exported zip loads back as a second adapter; two copies at weight 0.5 each are the adapter at strength 1."""
    images, _ = inputs
    zip_path = app.export_adapter(state, "blue", example_images=images[:1])
    with zipfile.ZipFile(zip_path) as archive:
        assert sorted(os.path.basename(n) for n in archive.namelist() if not n.endswith("/")) == sorted(
            [CARD_NAME, GRID_NAME, lora.LORA_WEIGHT_NAME]
        )
    name = app.load_adapter(state, zip_path, "blue_copy")
    try:
        assert name == "blue_copy" and "blue_copy" in state.adapters
        single = app.edit_images(state, images, "blue", 1.0)
        copy = app.edit_images(state, images, "blue_copy", 1.0)
        mixed = app.edit_images(state, images, "blue", 1.0, second_adapter="blue_copy", weight=0.5, second_weight=0.5)
        half = app.edit_images(state, images, "blue", 0.5)
        mixed_half = app.edit_images(state, images, "blue", 0.5, second_adapter="blue_copy", weight=0.5,
                                     second_weight=0.5)  # fmt: skip
        for i in range(2):
            assert np.array_equal(pixels(copy.after[i]), pixels(single.after[i]))
            assert np.array_equal(pixels(mixed.after[i]), pixels(single.after[i]))
            assert np.array_equal(pixels(mixed_half.after[i]), pixels(half.after[i]))
        assert app.load_adapter(state, zip_path) == "blue_circle"  # named after its target prompt
    finally:
        state.pipe.delete_adapters([n for n in ("blue_copy", "blue_circle") if n in state.adapters])


def test_concurrent_requests_do_not_interfere(state, inputs):
    """Two users editing with different adapter settings at once get what each would get alone."""
    images, _ = inputs
    requests = [dict(adapter="blue", edit_strength=1.0), dict(adapter="blue", edit_strength=0.3), dict(adapter=None)]
    alone = [app.edit_images(state, images, **r).after for r in requests]
    results, errors = [None] * len(requests), []

    def work(i):
        try:
            results[i] = app.edit_images(state, images, **requests[i]).after
        except Exception as error:  # reported below, with the request
            errors.append((i, error))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    for got, expected in zip(results, alone):
        assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(got, expected))


def test_finetune_adapter_reports_progress_and_loss(state, inputs):
    images, _ = inputs
    reports = []
    result = app.finetune_adapter(state, images, "red circle", "blue circle", num_epochs=1, learning_rate=1e-3,
                                  lora_rank=2, report=lambda *r: reports.append(r))  # fmt: skip
    try:
        assert result.adapter_name == "blue_circle" and result.adapter_name in state.adapters
        assert len(result.loss_history) == TINY_FINETUNE["num_train_steps"]
        assert "loss" in result.summary()
        assert reports and reports[-1][0] == reports[-1][1]  # done == total at the end
        assert "loss" in reports[-1][2]
        assert lora.adapter_settings(state.pipe.unet, result.adapter_name).rank == 2
        assert os.path.isfile(result.zip_path)
        assert "progress_bar" not in vars(state.pipe)  # the pipeline's own bars again
    finally:
        state.pipe.delete_adapters(result.adapter_name)


def test_example_images_come_from_the_models_renderer(state):
    images = app.example_images(state, "a green square", 3, seed=4)
    assert [im.size for im in images] == [(32, 32)] * 3
    with pytest.raises(ValueError, match="no colour"):
        app.example_images(state, "a square", 1)
    with pytest.raises(ValueError, match="no renderer"):
        app.example_images(app.AppState(state.pipe, model="some/model"), "a red circle")


# ---- served, through gradio_client ------------------------------------------------------------------------------


def test_client_edit(client, inputs):
    from gradio_client import handle_file

    _, paths = inputs
    gallery = [{"image": handle_file(p), "caption": None} for p in paths]
    before_after, reconstruction, strips = client.predict(
        gallery, "blue", 1.0, TINY_EDIT["t0"], app.NO_ADAPTER, 0.5, 0.5, api_name="/edit"
    )
    before, after = before_after
    assert PIL.Image.open(before).size == PIL.Image.open(after).size == PIL.Image.open(reconstruction).size == (32, 32)
    assert np.array_equal(pixels(before), pixels(paths[0]))  # the test-bed images are the model's size already
    assert np.abs(pixels(after) - pixels(before)).max() > 0
    assert len(strips) == 2
    (_, after_zero), reconstruction_zero, _ = client.predict(
        gallery, "blue", 0.0, TINY_EDIT["t0"], app.NO_ADAPTER, 0.5, 0.5, api_name="/edit"
    )
    assert np.array_equal(pixels(after_zero), pixels(reconstruction_zero))
    assert np.array_equal(pixels(reconstruction_zero), pixels(reconstruction))


def test_client_finetune(client, state, inputs):
    from gradio_client import handle_file

    _, paths = inputs
    gallery = [{"image": handle_file(p), "caption": None} for p in paths]
    summary, zip_path, *_ = client.predict(
        gallery, "red circle", "blue circle", 1, 1e-3, 2, "tiny", api_name="/finetune"
    )
    try:
        assert "tiny" in state.adapters and "loss" in summary
        with zipfile.ZipFile(zip_path) as archive:
            names = {os.path.basename(n) for n in archive.namelist()}
        assert {lora.LORA_WEIGHT_NAME, CARD_NAME, GRID_NAME} <= names
    finally:
        state.pipe.delete_adapters("tiny")


def test_client_examples_and_errors(client):
    from gradio_client.exceptions import AppError

    gallery = client.predict("red circle", api_name="/examples")
    assert len(gallery) == 4 and PIL.Image.open(gallery[0]["image"]).size == (32, 32)
    with pytest.raises(AppError, match="Upload an image"):
        client.predict([], "blue", 1.0, 400, app.NO_ADAPTER, 0.5, 0.5, api_name="/edit")
    with pytest.raises(AppError, match="no colour"):
        client.predict("a circle", api_name="/examples")


def test_a_user_mistake_is_logged_as_one_line_not_a_traceback(client, capfd):
    from gradio_client.exceptions import AppError

    capfd.readouterr()
    with pytest.raises(AppError, match="no colour"):
        client.predict("a circle", api_name="/examples")
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    assert [line for line in err.splitlines() if "diffusionclip app: on_examples:" in line], err


def test_the_app_command_prints_its_url_and_no_share_link_advice(tmp_path):
    """Gradio's start-up lines advise ``share=True``, which this offline app never uses."""
    pytest.importorskip("gradio")
    port = str(free_port())
    command = [sys.executable, "-m", "diffusionclip_pipeline.commands.app", "--port", port, "--threads", "1"]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "running on http://127.0.0.1:" in line:
                break
    finally:
        process.terminate()
        process.wait(timeout=30)
    output = "".join(lines)
    assert "running on http://127.0.0.1:" in output, output
    assert "share=True" not in output, output


def test_served_page_is_offline(client):
    """No analytics, and the page loads nothing from other hosts (gradio serves its bundled frontend)."""
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    page = urllib.request.urlopen(client.src, timeout=30).read().decode()
    for host in ("cdn.jsdelivr", "fonts.googleapis", "unpkg.com", "gradio.live"):
        assert host not in page


# ---- the command ------------------------------------------------------------------------------------------------


def test_app_command_is_registered():
    parser = build_parser()
    args = parser.parse_args(["app", "--port", "8000"])
    assert (args.model, args.host, args.port, args.func) == ("testbed", "127.0.0.1", 8000, app.run)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["app", "--port", "0"])
    assert exit_info.value.code == 2


def test_core_package_and_cli_work_without_gradio():
    """Without gradio, the package and the CLI import, and ``diffusionclip app`` ends with a one-line hint."""
    code = (
        "import sys; sys.modules['gradio'] = None\n"  # makes `import gradio` raise ImportError
        "import diffusionclip_pipeline, diffusionclip_pipeline.commands.main\n"
        "from diffusionclip_pipeline.commands import app\n"
        "sys.exit(app.main(['--port', '7999']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "the app needs gradio" in done.stderr.strip().splitlines()[-1]

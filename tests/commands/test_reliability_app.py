"""The web app is safe to expose on a LAN (docs/reliability.md, "Exposing the app"): a path a web user gives is
confined to the app's adapter folders, every numeric input and every file is bounded, a cancelled fine-tuning run
stops at its next step and leaves no adapter, and adapters can be deleted. Driven over HTTP with gradio_client
against the app served on 127.0.0.1, on the test-bed with tiny settings."""

from __future__ import annotations

import os
import threading
import time
import zipfile

import numpy as np
import PIL.Image
import pytest
from conftest import served_client

from diffusionclip_pipeline.commands import app
from diffusionclip_pipeline.commands.app_limits import NOT_ALLOWED, AppLimits
from diffusionclip_pipeline.loaders.lora_file import LORA_WEIGHT_NAME

pytestmark = [
    pytest.mark.filterwarnings("ignore:Adapter .* was active which is now deleted"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

TINY_EDIT = dict(t0=400, num_inversion_steps=4, num_inference_steps=4)
TINY_FINETUNE = dict(num_train_steps=2, num_inversion_steps=4, num_fixed_point_iterations=0, clip_num_augmentations=1)
LIMITS = AppLimits(max_epochs=500, max_lora_rank=8, max_images=3, max_image_pixels=256 * 256, max_file_bytes=2**20,
                   max_adapters=6)  # fmt: skip


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """The app's adapter folder (holding the adapter ``blue/``) and a folder outside it."""
    return tmp_path_factory.mktemp("adapter_root"), tmp_path_factory.mktemp("elsewhere")


@pytest.fixture(scope="module")
def state(roots):
    """The test-bed app state with tiny settings, the limits above, ``roots[0]`` as its adapter folder, and one
    fine-tuned adapter ``blue`` saved there."""
    state = app.AppState.load("testbed", adapter_roots=[str(roots[0])], limits=LIMITS)
    state.edit_defaults.update(TINY_EDIT)
    state.finetune_defaults.update(TINY_FINETUNE)
    images = app.example_images(state, "red circle", 2)
    state.pipe.finetune("red circle", "blue circle", images=images, num_epochs=1, adapter_name="blue",
                        **TINY_FINETUNE)  # fmt: skip
    state.pipe.save_lora_weights(str(roots[0] / "blue"), adapter_name="blue")
    state.pipe.delete_adapters("blue")
    return state


@pytest.fixture(scope="module")
def client(state):
    yield from served_client(state)


@pytest.fixture
def cleanup(state):
    before = set(state.adapters)
    yield
    state.pipe.delete_adapters([n for n in state.adapters if n not in before])


def load(client, path: str, timeout: float = 30):
    """``/load_adapter`` of a server path; the job's result or its exception (within ``timeout`` seconds)."""
    job = client.submit(path, None, "", api_name="/load_adapter")
    try:
        return job.result(timeout=timeout)
    except Exception as error:  # AppError: what the user sees
        return error


def gallery(paths):
    from gradio_client import handle_file

    return [{"image": handle_file(str(p)), "caption": None} for p in paths]


# ---- item 1: server paths --------------------------------------------------------------------------------------


def test_a_path_outside_the_adapter_folders_or_not_a_regular_file_is_refused_alike(client, state, roots, cleanup):
    """/dev/zero (which drove the server to 12.5 GB), a FIFO (which hung the queue), /etc/shadow and a missing file
    get the same message; so do links out of the adapter folder and files over the size limit inside it."""
    root, elsewhere = roots
    os.mkfifo(elsewhere / "fifo")
    os.mkfifo(root / "fifo.safetensors")
    (root / "escape").symlink_to(elsewhere)
    (root / "zero.safetensors").symlink_to("/dev/zero")
    with open(root / "huge.safetensors", "wb") as f:  # sparse: 1 GiB on paper
        f.truncate(2**30)
    (elsewhere / "blue").mkdir()
    for name in os.listdir(root / "blue"):
        (elsewhere / "blue" / name).write_bytes((root / "blue" / name).read_bytes())
    refused = ["/dev/zero", str(elsewhere / "fifo"), "/etc/shadow", "/etc/passwd", "/no/such/file", "../../etc/passwd",
               str(elsewhere / "blue"), "escape/blue", "fifo.safetensors", "zero.safetensors", "huge.safetensors",
               str(root / "missing"), "/proc/self/environ"]  # fmt: skip
    before = list(state.adapters)
    for path in refused:
        started = time.monotonic()
        error = load(client, path)
        assert isinstance(error, Exception), path
        assert str(error).strip() == NOT_ALLOWED.format(path=path) or NOT_ALLOWED.format(path=path) in str(error), (
            path, str(error))  # fmt: skip
        assert time.monotonic() - started < 20, path
    assert state.adapters == before
    assert app.load_adapter(state, "blue", "from_root") == "from_root"  # relative to the adapter folder
    assert app.load_adapter(state, str(root / "blue" / LORA_WEIGHT_NAME), "by_file") == "by_file"


def test_an_upload_is_bounded_and_a_zip_expansion_too(client, state, roots, tmp_path, cleanup):
    from gradio_client import handle_file

    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\0" * (LIMITS.max_file_bytes + 1))
    with pytest.raises(Exception, match="(?i)size|large"):
        client.predict("", handle_file(str(big)), "", api_name="/load_adapter")
    bomb = tmp_path / "bomb.zip"  # a few KB that expand to 8 MiB, past the limit of 1 MiB
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"x/{LORA_WEIGHT_NAME}", b"\0" * (8 * 2**20))
    assert bomb.stat().st_size < LIMITS.max_file_bytes
    with pytest.raises(Exception, match="expands beyond"):
        client.predict("", handle_file(str(bomb)), "", api_name="/load_adapter")
    assert not [f for f in os.listdir(state.workdir) if f.startswith("upload-")]  # the extraction was removed
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as archive:
        archive.write(roots[0] / "blue" / LORA_WEIGHT_NAME, f"blue/{LORA_WEIGHT_NAME}")
    client.predict("", handle_file(str(good)), "uploaded", api_name="/load_adapter")
    assert "uploaded" in state.adapters


# ---- item 2: bounds, cancellation, deletion ---------------------------------------------------------------------


def test_every_numeric_input_is_bounded_on_the_server(client, state, tmp_path, cleanup):
    from gradio_client.exceptions import AppError

    images = app.example_images(state, "red circle", 4)
    paths = []
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    PIL.Image.new("RGB", (300, 300), "red").save(tmp_path / "large.png")
    before = list(state.adapters)
    cases = [
        ((gallery(paths[:2]), "red circle", "blue circle", 10**9, 1e-3, 2, "x"), "num_epochs"),
        ((gallery(paths[:2]), "red circle", "blue circle", 1, 1e-3, 4096, "x"), "lora_rank"),
        ((gallery(paths[:2]), "red circle", "blue circle", 1, 1e9, 2, "x"), "learning_rate"),
        ((gallery(paths), "red circle", "blue circle", 1, 1e-3, 2, "x"), "At most 3 images"),
        ((gallery([tmp_path / "large.png"]), "red circle", "blue circle", 1, 1e-3, 2, "x"), "pixels"),
    ]
    for args, message in cases:
        started = time.monotonic()
        with pytest.raises(AppError, match=message):
            client.predict(*args, api_name="/finetune")
        assert time.monotonic() - started < 20
    for strength in (1e9, -1e9):  # gradio's slider refuses these itself, and edit_images would
        with pytest.raises(AppError, match="edit_strength|maximum|minimum"):
            client.predict(gallery(paths[:1]), app.NO_ADAPTER, strength, 400, app.NO_ADAPTER, 0.5, 0.5,
                           api_name="/edit")  # fmt: skip
    with pytest.raises(AppError, match="t0|maximum"):
        client.predict(gallery(paths[:1]), None, 1.0, 10**9, app.NO_ADAPTER, 0.5, 0.5, api_name="/edit")
    assert state.adapters == before
    with pytest.raises(ValueError, match="edit_strength"):
        app.edit_images(state, images[:1], None, edit_strength=1e9)


def test_cancel_stops_a_fine_tuning_run_at_its_next_step_and_discards_it(client, state, tmp_path, cleanup):
    """A run of 500 epochs, cancelled as soon as its adapter exists, is gone within seconds: the lock is free for
    the next request, and no adapter is left."""
    images = app.example_images(state, "red circle", 2)
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    job = client.submit(gallery([tmp_path / "0.png", tmp_path / "1.png"]), "red circle", "blue circle", 500, 1e-3, 2,
                        "long", api_name="/finetune")  # fmt: skip
    deadline = time.monotonic() + 120
    while "long" not in state.adapters:
        assert time.monotonic() < deadline and not job.done(), "the run did not start"
        time.sleep(0.05)
    job.cancel()
    deadline = time.monotonic() + 60
    while "long" in state.adapters:
        assert time.monotonic() < deadline, "the cancelled run kept training"
        time.sleep(0.05)
    result = client.predict(gallery([tmp_path / "0.png"]), app.NO_ADAPTER, 1.0, 400, app.NO_ADAPTER, 0.5, 0.5,
                            api_name="/edit")  # fmt: skip
    assert result  # another request gets the pipeline
    assert "long" not in state.adapters and "progress_bar" not in vars(state.pipe)


def test_a_run_longer_than_the_time_limit_is_stopped(state, cleanup):
    import dataclasses

    short = dataclasses.replace(state, limits=dataclasses.replace(LIMITS, max_finetune_seconds=0.5))
    with pytest.raises(app.FinetuneStopped, match="longer than this app allows"):
        app.finetune_adapter(short, None, "red circle", "blue circle", num_epochs=500, adapter_name="slow")
    assert "slow" not in state.adapters


def test_adapters_can_be_deleted_in_the_app_but_not_the_models_own(client, state, cleanup):
    from gradio_client.exceptions import AppError

    app.load_adapter(state, "blue", "to_delete")
    export = app.export_adapter(state, "to_delete")
    client.predict("to_delete", api_name="/delete_adapter")
    assert "to_delete" not in state.adapters and not os.path.exists(export)
    with pytest.raises(AppError, match="No adapter named"):
        client.predict("to_delete", api_name="/delete_adapter")
    app.load_adapter(state, "blue", "own")
    protected = app.AppState(state.pipe, limits=LIMITS, protected=frozenset({"own"}))
    with pytest.raises(ValueError, match="came with the model"):
        app.delete_adapter(protected, "own")


def test_the_number_of_loaded_adapters_is_bounded(state, cleanup):
    room = LIMITS.max_adapters - len(state.adapters)
    for i in range(room):
        app.load_adapter(state, "blue", f"n{i}")
    with pytest.raises(ValueError, match="delete one first"):
        app.load_adapter(state, "blue", "one_too_many")


def test_concurrent_loads_are_safe(state, cleanup):
    errors = []

    def work(i):
        try:
            app.load_adapter(state, "blue", f"c{i}")
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and {"c0", "c1", "c2"} <= set(state.adapters)


# ---- item 3 and 11: images the app is given ------------------------------------------------------------------


def test_a_16_bit_grey_upload_is_not_white_and_a_non_image_is_a_clear_error(client, tmp_path):
    from gradio_client.exceptions import AppError

    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
    PIL.Image.fromarray(ramp).save(tmp_path / "grey16.png")
    (before, _), _, _ = client.predict(gallery([tmp_path / "grey16.png"]), app.NO_ADAPTER, 1.0, 400, app.NO_ADAPTER,
                                       0.5, 0.5, api_name="/edit")  # fmt: skip
    shown = np.asarray(PIL.Image.open(before).convert("L"), dtype=np.int16)
    assert shown[:, 0].mean() < 20 and shown[:, -1].mean() > 235  # a ramp, black to white (was all 255)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(AppError, match="image 1 cannot be used: not a readable image"):
        client.predict(gallery([tmp_path / "notes.png"]), app.NO_ADAPTER, 1.0, 400, app.NO_ADAPTER, 0.5, 0.5,
                       api_name="/edit")  # fmt: skip


def test_what_an_image_loses_is_reported(state):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0], rgba[:16, :, 3] = 255, 255
    result = app.edit_images(state, [PIL.Image.fromarray(rgba)], None)
    assert any("transparent" in note for note in result.notes)


def test_an_adapter_loaded_by_one_client_is_usable_by_another(client, state, tmp_path, cleanup):
    """The adapters are the server's, not a session's: a fresh API client edits with one another client loaded."""
    from gradio_client import Client

    loaded = load(client, "blue")  # through the first client's session
    assert not isinstance(loaded, Exception), loaded
    name = next(n for n in state.adapters if n.startswith("blue"))
    paths = []
    for i, image in enumerate(app.example_images(state, "red circle", 1, seed=3)):
        image.save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    other = Client(client.src, verbose=False)
    result = other.predict(gallery(paths), name, 1.0, TINY_EDIT.get("t0", 400), app.NO_ADAPTER, 0.5, 0.5,
                           api_name="/edit")  # fmt: skip
    assert isinstance(result, (list, tuple)) and len(result) >= 3  # the views, the strips, the result

"""Video editing (`diffusionclip_pipeline.batch.edit_video`, issue 33) on a tiny synthetic clip of a moving square:
every frame edited, the frame rate kept, the flicker measure, one shared noise, resuming, the CLI's ``--video``."""

import json

import numpy as np
import PIL.Image
import pytest
from conftest import add_random_adapter, make_pipeline

from diffusionclip_pipeline.batch import edit_video, flicker, read_video, write_video
from diffusionclip_pipeline.commands.main import main
from diffusionclip_pipeline.image_processing import postprocess_image

EDIT = dict(t0=50, num_inversion_steps=2, num_inference_steps=2)


@pytest.fixture
def pipe():
    pipe = make_pipeline()
    add_random_adapter(pipe, "blue")
    return pipe


def moving_square(n: int = 6, size: int = 16, step: int = 2) -> list:
    """A red 6 px square moving ``step`` px right each frame, on white."""
    frames = []
    for t in range(n):
        frame = PIL.Image.new("RGB", (size, size), (255, 255, 255))
        frame.paste((220, 30, 30), (1 + t * step, 5, 7 + t * step, 11))
        frames.append(frame)
    return frames


def test_flicker_is_the_mean_frame_to_frame_change():
    assert flicker(np.zeros((1, 2, 2, 3))) == 0.0
    frames = np.stack([np.zeros((2, 2, 3)), np.full((2, 2, 3), 0.5), np.full((2, 2, 3), 0.25)])
    assert flicker(frames) == pytest.approx((0.5 + 0.25) / 2)
    images = [PIL.Image.new("RGB", (2, 2), (0, 0, 0)), PIL.Image.new("RGB", (2, 2), (255, 0, 0))]
    assert flicker(images) == pytest.approx(1 / 3)  # one channel of three changed by 1


def test_a_gif_is_edited_frame_by_frame_at_its_frame_rate(tmp_path, pipe):
    write_video(moving_square(), str(tmp_path / "clip.gif"), fps=5)  # a GIF keeps frame times in 1/100 s
    source, fps = read_video(str(tmp_path / "clip.gif"))
    assert (len(source), fps) == (6, 5.0)
    result = edit_video(pipe, str(tmp_path / "clip.gif"), str(tmp_path / "out"), batch_size=4, show_progress=False,
                        **EDIT)  # fmt: skip
    assert result.video == str(tmp_path / "out" / "clip_edited.gif") and (result.fps, result.num_frames) == (5.0, 6)
    with PIL.Image.open(result.video) as video:
        assert (video.n_frames, video.info["duration"], video.size) == (6, 200, (16, 16))
    # the measure, from the edited frames and the source as the model sees it
    edited = [PIL.Image.open(tmp_path / "out" / "frames" / f"frame_{i:06d}.png").convert("RGB") for i in range(6)]
    expected_source = flicker(postprocess_image(pipe.prepare_image(source).float()))
    assert result.edit_flicker == pytest.approx(flicker(edited))
    assert result.source_flicker == pytest.approx(expected_source) and result.source_flicker > 0
    assert result.flicker == pytest.approx(result.edit_flicker - result.source_flicker)
    report = json.loads((tmp_path / "out" / "flicker.json").read_text())
    assert report["flicker"] == pytest.approx(result.flicker) and report["fps"] == 5.0
    # the same command again: every frame is done already
    again = edit_video(pipe, str(tmp_path / "clip.gif"), str(tmp_path / "out"), show_progress=False, **EDIT)
    assert (again.frames.num_done, again.frames.num_skipped) == (0, 6)
    # another video into the same folder is refused
    write_video(moving_square(step=1), str(tmp_path / "clip.gif"), fps=5)
    with pytest.raises(ValueError, match="other settings"):
        edit_video(pipe, str(tmp_path / "clip.gif"), str(tmp_path / "out"), show_progress=False, **EDIT)


def test_frames_share_one_noise(tmp_path, pipe):
    # a still scene: with one shared encoding noise every frame's edit is the same image (no added flicker)
    still = tmp_path / "still"
    still.mkdir()
    for i, frame in enumerate([moving_square()[2]] * 3):
        frame.save(still / f"{i:03d}.png")
    result = edit_video(pipe, str(still), str(tmp_path / "out"), fps=5, batch_size=2, seed=3, show_progress=False,
                        encoding="noise", **EDIT)  # fmt: skip
    frames = [(tmp_path / "out" / "frames" / f"frame_{i:06d}.png").read_bytes() for i in range(3)]
    assert frames[0] == frames[1] == frames[2]
    assert (result.edit_flicker, result.source_flicker, result.flicker, result.fps) == (0.0, 0.0, 0.0, 5.0)
    assert result.video.endswith("still_edited.gif")
    # a noise per frame (for comparison): the same still frames edit differently
    apart = edit_video(pipe, str(still), str(tmp_path / "apart"), fps=5, seed=3, shared_noise=False,
                       show_progress=False, encoding="noise", **EDIT)  # fmt: skip
    assert apart.edit_flicker > 0 and apart.flicker == apart.edit_flicker


def test_an_mp4_keeps_its_frame_rate(tmp_path, pipe):
    pytest.importorskip("imageio_ffmpeg", reason="the 'video' extra is not installed")
    from diffusers.utils import load_video

    write_video(moving_square(), str(tmp_path / "clip.mp4"), fps=12)
    result = edit_video(pipe, str(tmp_path / "clip.mp4"), str(tmp_path / "out"), show_progress=False, **EDIT)
    frames, fps = load_video(result.video, return_fps=True)
    assert result.video.endswith("clip_edited.mp4") and (len(frames), fps) == (6, 12.0)
    assert frames[0].size == (16, 16)


def test_cli_video(setup, capsys):
    write_video(moving_square(4), str(setup / "clip.gif"), fps=4)
    argv = ["edit", "--model", str(setup / "pipe"), "--video", str(setup / "clip.gif"), "--output", str(setup / "v"),
            "--t0", "50", "--num-inversion-steps", "2", "--num-inference-steps", "2", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"wrote {setup / 'v' / 'clip_edited.gif'} (4 frames at 4 fps); flicker " in out
    assert sorted(p.name for p in (setup / "v").iterdir()) == ["clip_edited.gif", "flicker.json", "frames", "source"]

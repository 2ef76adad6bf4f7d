"""`edit_video`: every frame of a video edited with one shared encoding (deterministic DDIM inversion per frame, or
one shared noise for ``encoding="noise"``), through `edit_images` (so across processes and resumable too), then put
back together at the source's frame rate, with a flicker measure.

Reading and writing use diffusers' `load_video` / `export_to_video`: a GIF needs nothing more (PIL); an MP4 needs the
``video`` extra (``pip install diffusionclip-pipeline[video]``: imageio and imageio-ffmpeg, which ships ffmpeg). A
folder of frame images works too (its frame rate is ``fps``, default 10).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from ..image_io import IMAGE_SUFFIXES
from .editing import BatchEditOutput, edit_images

__all__ = ["VideoEditOutput", "edit_video", "flicker", "read_video", "write_video"]

DEFAULT_FPS = 10.0


@dataclass
class VideoEditOutput:
    """What `edit_video` made.

    Args:
        video (`str`): The edited video (`None` on processes other than the main one, which writes it).
        fps (`float`): Its frame rate: the source's.
        num_frames (`int`): Frames of the source, all edited.
        flicker (`float`): Mean frame-to-frame absolute change of the edit (pixels in [0, 1]) minus the source's, the
            source taken as the model sees it (`flicker`): near 0, the edit flickers no more than the source.
        edit_flicker / source_flicker (`float`): The two terms.
        frames (`BatchEditOutput`): This process's share of the frame edits.
    """

    video: str | None
    fps: float
    num_frames: int
    flicker: float
    edit_flicker: float
    source_flicker: float
    frames: BatchEditOutput


def read_video(video: str, fps: float | None = None) -> tuple[list, float]:
    """The frames (RGB PIL images) and frame rate of a video file (diffusers' `load_video`) or a folder of frame
    images (sorted by name). ``fps`` overrides the frame rate; a source that records none gets `DEFAULT_FPS`.

    Raises:
        `FileNotFoundError`: ``video`` does not exist. `ImportError`: a video file that needs the ``video`` extra.
    """
    if os.path.isdir(video):
        from ..image_io import read_image

        names = sorted(n for n in os.listdir(video) if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith("."))
        frames, source_fps = [read_image(os.path.join(video, n)) for n in names], None
    elif os.path.isfile(video):
        from diffusers.utils import load_video

        if not video.lower().endswith(".gif"):
            _require_imageio("read", video)
        frames, source_fps = load_video(video, return_fps=True)
    else:
        raise FileNotFoundError(f"`video` {video}: no such file or folder.")
    if not frames:
        raise ValueError(f"`video` {video} holds no frames.")
    return [f.convert("RGB") for f in frames], float(fps or source_fps or DEFAULT_FPS)


def _require_imageio(what: str, path: str) -> None:
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"To {what} the video {path}, install the 'video' extra (pip install 'diffusionclip-pipeline[video]': "
            "imageio and imageio-ffmpeg); a GIF or a folder of frames needs neither."
        ) from error


def write_video(frames: list, path: str, fps: float) -> None:
    """Writes ``frames`` to ``path`` atomically at ``fps``: a GIF through PIL (no extra needed), any other suffix
    through diffusers' `export_to_video` (the ``video`` extra)."""
    from ..utils.io import atomic_write

    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".gif":

        def write(tmp: str) -> None:
            frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=1000 / fps, loop=0)

    else:
        _require_imageio("write", path)
        from diffusers.utils import export_to_video

        def write(tmp: str) -> None:  # imageio picks the format by the suffix: write beside, then move in place
            named = tmp + suffix
            try:
                export_to_video(frames, named, fps=fps, macro_block_size=1)
                os.replace(named, tmp)
            finally:
                if os.path.exists(named):
                    os.remove(named)

    atomic_write(path, write)


def flicker(frames) -> float:
    """Mean absolute change between consecutive frames, pixels in [0, 1] (0 for a still video): ``mean_t
    mean |f_{t+1} - f_t|``. ``frames``: PIL images of one size, or an array (T, H, W, C) in [0, 1]."""
    import numpy as np

    array = np.asarray(frames if isinstance(frames, np.ndarray) else [np.asarray(f) / 255.0 for f in frames])
    if array.shape[0] < 2:
        return 0.0
    return float(np.abs(np.diff(array.astype(np.float64), axis=0)).mean())


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            digest.update(name.encode())
            if os.path.isfile(os.path.join(path, name)):
                digest.update(_file_digest(os.path.join(path, name)).encode())
        return digest.hexdigest()[:16]
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _write_source_frames(frames: list, folder: str) -> None:
    """The source frames as numbered PNGs (the inputs of `edit_images`), written atomically; frames of another
    video left there are removed (a changed video is then refused by the manifest, or redone with ``overwrite``)."""
    from ..image_io import save_atomic

    os.makedirs(folder, exist_ok=True)
    names = [f"frame_{index:06d}.png" for index in range(len(frames))]
    for stale in set(os.listdir(folder)) - set(names):
        if stale.startswith("frame_"):
            os.remove(os.path.join(folder, stale))
    for name, frame in zip(names, frames):
        save_atomic(frame, os.path.join(folder, name))


def edit_video(
    pipe,
    video: str,
    output_dir: str,
    fps: float | None = None,
    batch_size: int = 8,
    seed: int = 0,
    overwrite: bool = False,
    show_progress: bool = True,
    shared_noise: bool = True,
    **edit_kwargs,
) -> VideoEditOutput:
    r"""
    Edits every frame of ``video`` with one shared encoding and writes ``output_dir/<name>_edited.<gif|mp4>`` at the
    source's frame rate, with ``flicker.json`` (`VideoEditOutput`'s measures). The frames go through `edit_images`
    (``output_dir/source/`` -> ``output_dir/frames/``, with its manifest), so the edit runs across processes and
    resumes after a kill; a run with another video, other settings or another adapter into the same folder is
    refused unless ``overwrite``.

    Args:
        pipe (`DiffusionCLIPPipeline`): The pipeline, its adapters loaded and active.
        video (`str`): A video file (a GIF, or with the ``video`` extra an MP4 or any format imageio-ffmpeg reads) or
            a folder of frame images.
        output_dir (`str`): The output folder.
        fps (`float`, *optional*): The frame rate (default: the source's; `DEFAULT_FPS` if it records none).
        batch_size, seed, overwrite, show_progress: As in `edit_images`.
        shared_noise (`bool`, *optional*, defaults to `True`): Every frame's noise (``encoding="noise"``, ``eta >
            0``) drawn from ``seed`` itself: one shared noise, so a still scene stays still. `False` gives each frame
            its own noise (seeded from its index), for comparison: it flickers more.
        **edit_kwargs: `DiffusionCLIPPipeline.edit` arguments.

    Returns:
        [`VideoEditOutput`]
    """
    from .editing import process_state

    # 1. Read the frames; the main process writes them once as the inputs of the frame edits
    frames, fps = read_video(os.fspath(video), fps)
    state = process_state(cpu=pipe.device.type == "cpu")
    source_dir, frames_dir = os.path.join(output_dir, "source"), os.path.join(output_dir, "frames")
    info = {"video": {"name": os.path.basename(os.path.normpath(video)), "sha256": _file_digest(video),
                      "frames": len(frames)}}  # fmt: skip
    if state.is_main_process:
        _write_source_frames(frames, source_dir)
    state.wait_for_everyone()
    # 2. Edit every frame (sharded, resumable), one shared noise
    result = edit_images(
        pipe, source_dir, frames_dir, batch_size=batch_size, seed=seed, overwrite=overwrite, shared_noise=shared_noise,
        show_progress=show_progress, run_info=info, **edit_kwargs,
    )  # fmt: skip
    # 3. Once every process is done, the main process puts the video together and measures the flicker
    state.wait_for_everyone()
    return _assemble(pipe, frames, fps, video, output_dir, result, state)


def _assemble(pipe, frames, fps, video, output_dir, result: BatchEditOutput, state) -> VideoEditOutput:
    import PIL.Image

    from ..image_processing import postprocess_image

    edited_path, measures = None, {}
    if state.is_main_process:
        names = [f"frame_{index:06d}.png" for index in range(len(frames))]
        missing = [n for n in names if not os.path.isfile(os.path.join(output_dir, "frames", n))]
        if missing:
            raise ValueError(f"{len(missing)} frame(s) could not be edited (e.g. {missing[0]}): see the manifest in "
                             f"{os.path.join(output_dir, 'frames')}.")  # fmt: skip
        edited = []
        for name in names:
            with PIL.Image.open(os.path.join(output_dir, "frames", name)) as image:
                edited.append(image.convert("RGB"))
        source = postprocess_image(pipe.prepare_image(frames).float().cpu())  # as the model sees them
        measures = {"edit_flicker": flicker(edited), "source_flicker": flicker(source)}
        measures["flicker"] = measures["edit_flicker"] - measures["source_flicker"]
        stem = os.path.splitext(os.path.basename(os.path.normpath(video)))[0]
        suffix = ".gif" if os.path.isdir(video) or video.lower().endswith(".gif") else ".mp4"
        edited_path = os.path.join(output_dir, f"{stem}_edited{suffix}")
        write_video(edited, edited_path, fps)
        from ..utils.io import atomic_write_text

        report = {**measures, "fps": fps, "num_frames": len(frames), "video": edited_path}
        atomic_write_text(os.path.join(output_dir, "flicker.json"), json.dumps(report, indent=2) + "\n")
    state.wait_for_everyone()
    if not state.is_main_process:
        with open(os.path.join(output_dir, "flicker.json"), encoding="utf-8") as handle:
            measures = {k: v for k, v in json.load(handle).items() if "flicker" in k}
    return VideoEditOutput(edited_path, fps, len(frames), frames=result, **measures)

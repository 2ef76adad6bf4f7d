"""Fuzz tests of the input surface (Hypothesis): every outcome is a result or a `ValueError` / `TypeError`.

Never another exception, never a NaN output, never a hang. Examples are bounded so the suite stays fast.
"""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import add_random_adapter, make_pipeline
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffusionclip_pipeline.image_processing import preprocess_image

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
EDIT = dict(t0=50, num_inversion_steps=1, num_inference_steps=1, output_type="pt")

PIL_MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LA", "I", "I;16", "F"]
FLOATS = st.sampled_from([0.0, 1.0, -1.0, 0.5, 2.0, -3.0, 255.0, 65535.0, 1e30, float("nan"), float("inf")])


@st.composite
def pil_images(draw):
    mode = draw(st.sampled_from(PIL_MODES))
    w, h = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    if mode in ("I", "I;16", "F") and w and h:  # wide modes: a fill value and one other pixel
        dtype = {"I": np.int32, "I;16": np.uint16, "F": np.float32}[mode]
        high = {"I": 70000, "I;16": 65535, "F": 2}[mode]
        array = np.full((h, w), draw(st.integers(0, high)), dtype=dtype)
        array[draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = draw(st.integers(0, high))
        image = PIL.Image.fromarray(array)  # uint16 -> "I;16", int32 -> "I", float32 -> "F"
        assert image.mode == mode
        return image
    return PIL.Image.new(mode, (w, h), color=draw(st.integers(0, 255)))


@st.composite
def arrays(draw):
    shape = tuple(draw(st.lists(st.integers(0, 20), min_size=1, max_size=5)))
    dtype = draw(st.sampled_from([np.uint8, np.uint16, np.int32, np.float16, np.float32, np.float64, np.bool_]))
    fill = draw(FLOATS) if np.issubdtype(dtype, np.floating) else draw(st.integers(0, 255))
    array = np.full(shape, fill, dtype=dtype) if shape else np.zeros((), dtype)
    if array.size and draw(st.booleans()) and np.issubdtype(dtype, np.floating):
        array.flat[0] = draw(FLOATS)
    return array


@st.composite
def tensors(draw):
    shape = tuple(draw(st.lists(st.integers(0, 20), min_size=1, max_size=5)))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.float64, torch.int64, torch.uint8, torch.bool]))
    x = torch.zeros(shape, dtype=dtype)
    if x.is_floating_point() and x.numel():
        x.fill_(draw(FLOATS))
    return x


ANY_INPUT = st.one_of(
    pil_images(),
    arrays(),
    tensors(),
    st.none(),
    st.integers(),
    st.text(max_size=5),
    st.lists(pil_images(), max_size=2),
)


@FUZZ
@given(image=ANY_INPUT, size=st.sampled_from([8, 16]), channels=st.sampled_from([1, 3]))
def test_preprocess_gives_a_finite_image_in_range_or_a_clear_error(image, size, channels):
    try:
        x = preprocess_image(image, size, channels)
    except (ValueError, TypeError):
        return
    assert x.shape[1:] == (channels, size, size) and x.shape[0] >= 1
    assert torch.isfinite(x).all() and x.min() >= -1 - 1e-3 and x.max() <= 1 + 1e-3


@pytest.fixture(scope="module")
def fuzz_pipe():
    return make_pipeline(with_clip=False)


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(image=ANY_INPUT)
def test_edit_gives_a_finite_result_or_a_clear_error(fuzz_pipe, image):
    try:
        out = fuzz_pipe.edit(image, **EDIT).images
    except (ValueError, TypeError):
        return
    assert torch.isfinite(out).all()


@pytest.fixture(scope="module")
def adapter_bytes(tmp_path_factory):
    pipe = make_pipeline(with_clip=False)
    add_random_adapter(pipe, "a")
    path = pipe.save_lora_weights(tmp_path_factory.mktemp("fuzz") / "good")
    with open(path, "rb") as f:
        return f.read()


def _load_outcome(pipe, data: bytes, path: str):
    with open(path, "wb") as f:
        f.write(data)
    try:
        name = pipe.load_lora_weights(path)
    except (ValueError, TypeError):
        assert pipe.lora_adapters == []
        return None
    out = pipe.edit(torch.zeros(1, 3, 16, 16), **EDIT).images
    assert torch.isfinite(out).all()
    pipe.unload_lora_weights(name)
    return name


@FUZZ
@given(cut=st.integers(0, 10_000), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=4))
def test_truncated_or_bit_flipped_adapter_files(fuzz_pipe, adapter_bytes, tmp_path_factory, cut, flips):
    data = bytearray(adapter_bytes[: max(0, len(adapter_bytes) - cut)] if cut % 3 else adapter_bytes)
    for position, mask in flips:
        if data:
            data[position % len(data)] ^= mask
    _load_outcome(fuzz_pipe, bytes(data), os.path.join(tmp_path_factory.mktemp("f"), "x.safetensors"))


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**9), 10**9), FLOATS, st.text(max_size=8)),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(
    key=st.sampled_from(["unet.r", "unet.lora_alpha", "unet.target_modules", "unet.use_dora", "unet.rank_pattern"]),
    value=JSON_VALUES,
    ours=st.one_of(st.none(), JSON_VALUES),
)
def test_adapter_files_with_random_metadata(fuzz_pipe, adapter_bytes, tmp_path_factory, key, value, ours):
    from safetensors.torch import load, save

    folder = tmp_path_factory.mktemp("m")
    good = os.path.join(folder, "good.safetensors")
    with open(good, "wb") as f:
        f.write(adapter_bytes)
    from safetensors import safe_open

    with safe_open(good, framework="pt") as f:
        metadata = dict(f.metadata())
    config = json.loads(metadata["lora_adapter_metadata"])
    config[key] = value
    metadata["lora_adapter_metadata"] = json.dumps(config, allow_nan=True)
    if ours is not None:
        metadata["diffusionclip"] = json.dumps(ours, allow_nan=True)
    data = save(load(adapter_bytes), metadata=metadata)
    _load_outcome(fuzz_pipe, data, os.path.join(folder, "x.safetensors"))

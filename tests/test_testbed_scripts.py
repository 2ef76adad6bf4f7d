"""The test-bed scripts' own logic that the re-measurements rely on (scripts/testbed/settings_search.py)."""

import os
import sys

import torch
from conftest import adapted_pixel_pipeline, random_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _edit_arguments():
    sys.path.insert(0, os.path.join(ROOT, "scripts", "testbed"))
    from settings_search import edit_arguments

    return edit_arguments


def test_adapter_min_t_applies_the_adapter_only_at_and_above_t():
    edit_arguments = _edit_arguments()
    pipe = adapted_pixel_pipeline("default")
    images = (random_images() + 1) / 2  # [0, 1] tensors
    kwargs = dict(t0=400, num_inversion_steps=4, num_inference_steps=4, output_type="pt")
    adapted = pipe.edit(images, **kwargs).images
    original = pipe.edit(images, edit_strength=0.0, **kwargs).images
    assert (adapted - original).abs().max() > 1e-3  # the adapter changes the edit at all

    def edit(min_t):
        return pipe.edit(images, **kwargs, **edit_arguments({"adapter_min_t": min_t}, seed=0)).images

    torch.testing.assert_close(edit(0), adapted)  # on at every step
    torch.testing.assert_close(edit(401), original)  # off at every step (the grid's largest t is 400)
    between = edit(200)
    assert (between - adapted).abs().max() > 1e-4 and (between - original).abs().max() > 1e-4


def test_edit_arguments_seeds_noise_encodings_only():
    edit_arguments = _edit_arguments()
    noise = edit_arguments({"encoding": "noise", "t0": 400}, seed=7)
    assert noise["generator"].initial_seed() == 7 and noise["t0"] == 400
    assert edit_arguments({"t0": 500}, seed=7) == {"t0": 500}

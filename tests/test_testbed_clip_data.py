"""The tiny CLIP's training data (scripts/testbed/train_clip.py): off-palette colours and tinted backgrounds."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "testbed"))
train_clip = pytest.importorskip("train_clip")

from diffusionclip_pipeline.testbed import world  # noqa: E402


def test_off_palette_colours_are_far_from_the_palette_and_named_by_the_nearest_extra_colour():
    rgb, ids = train_clip.off_palette_colours(np.random.default_rng(0), 200)
    refs = np.array(list(world.COLOURS.values()) + [(255, 255, 255)], float)
    dist = np.linalg.norm(rgb[:, None].astype(float) - refs[None], axis=-1).min(1)
    assert rgb.shape == (200, 3) and dist.min() >= train_clip.OFF_PALETTE_MIN_DISTANCE - 1  # rounding to uint8
    extra = np.array(list(train_clip.EXTRA_COLOURS.values()), float)
    nearest = np.linalg.norm(rgb[:, None].astype(float) - extra[None], axis=-1).argmin(1)
    assert (ids == train_clip.NC + nearest).mean() >= 0.99  # labels come from the unrounded colour


def test_batch_labels_off_palette_images_and_tints_only_the_background():
    rng = np.random.default_rng(1)
    imgs, col, shp, texts, tc, ts = train_clip.make_batch(rng, 64, 32, 0.0, 0.0, off_frac=0.5, tint_frac=1.0)
    assert imgs.shape == (64, 32, 32, 3) and col.shape == (64, train_clip.NA) and len(texts) == 64
    off = col[:, train_clip.NC :].sum(1) > 0
    assert 10 < off.sum() < 54
    np.testing.assert_allclose(col.sum(1), train_clip.TINT_LABEL_WEIGHT)  # every image is tinted here
    # every background is tinted (no pure white left), at most 15 % of the way from white to some colour
    assert not (imgs == 255).all(-1).any()
    for img in imgs:
        colours, counts = np.unique(img.reshape(-1, 3), axis=0, return_counts=True)
        background = colours[counts.argmax()].astype(float)
        assert 0 < np.linalg.norm(255 - background) <= 0.15 * 255 * 3**0.5 + 1
    # captions of the images' own colour exist for off-palette images (guaranteed positives in the first half)
    assert any(tc[i] >= train_clip.NC for i in range(32) if off[i])
    _, col, *_ = train_clip.make_batch(rng, 64, 32, 0.0, 0.0, off_frac=0.5, tint_frac=0.0)
    np.testing.assert_allclose(col.sum(1), 1.0)
    m = train_clip.match_matrix(col, shp, tc, ts)
    assert m.shape == (64, 64) and float(m.max()) == 1.0


def test_colour_peak_reports_fractions():
    tok = train_clip.build_tokenizer()
    clip = train_clip.build_clip(tok, 32).eval()
    out = train_clip.colour_peak(clip, tok, 32, n=8)
    assert set(out) == {"peak_vs_off_palette", "peak_vs_mixed", "peak_vs_saturated", "peak_vs_tinted_background"}
    assert all(0.0 <= v <= 1.0 for v in out.values())


def test_default_tokenizer_is_the_shipped_one_and_extra_colours_extend_it():
    from transformers import CLIPTokenizer

    from diffusionclip_pipeline.testbed import WEIGHTS_DIR

    shipped = CLIPTokenizer.from_pretrained(os.path.join(WEIGHTS_DIR, "tokenizer"))
    assert train_clip.build_tokenizer().get_vocab() == shipped.get_vocab()
    extended = train_clip.build_tokenizer(extra_colours=True).get_vocab()
    assert len(extended) > len(shipped.get_vocab())
    assert "orange</w>" in extended and "orange</w>" not in shipped.get_vocab()

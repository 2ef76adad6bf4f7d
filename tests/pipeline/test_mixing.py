import pytest
import torch
from conftest import make_pipeline, random_images

from diffusionclip_pipeline.noise_mixing import piecewise_weights

TINY = dict(t0=100, num_inversion_steps=3, num_train_steps=2, num_epochs=1, batch_size=2, learning_rate=2e-2)


@pytest.fixture(scope="module")
def trained():
    """A pipeline with two adapters, 'blue' and 'square' (tiny, random components)."""
    pipe = make_pipeline()
    imgs = random_images(2)
    pipe.finetune("red circle", "blue circle", images=imgs, adapter_name="blue", **TINY)
    pipe.finetune("red circle", "red square", images=imgs, adapter_name="square", **TINY)
    pipe.set_adapters("blue")
    return pipe


def one_step(pipe, latents, **kwargs):
    """x after a single DDIM step from t0 = 200 to the clean image: affine in the noise prediction."""
    captured = {}

    def grab(p, i, t, kw):
        captured["x"] = kw["latents"]

    pipe.edit(latents=latents, t0=200, num_inference_steps=1, output_type="pt", callback_on_step_end=grab, **kwargs)
    return captured["x"]


def test_strength_interpolates_noise_predictions_exactly(trained):
    x = random_images(2, seed=9)
    full, none = one_step(trained, x), one_step(trained, x, edit_strength=0.0)
    trained.disable_lora()
    torch.testing.assert_close(none, one_step(trained, x))  # r = 0 is the reconstruction
    trained.enable_lora()
    for r in (0.25, 0.5):
        torch.testing.assert_close(
            one_step(trained, x, edit_strength=r), r * full + (1 - r) * none, atol=1e-5, rtol=1e-5
        )
    with pytest.warns(UserWarning, match="extrapolating"):
        extra = one_step(trained, x, edit_strength=1.5)
    torch.testing.assert_close(extra, 1.5 * full - 0.5 * none, atol=1e-5, rtol=1e-5)


def test_old_strength_keyword_still_works_with_a_future_warning(trained):
    x = random_images(2, seed=9)
    with pytest.warns(FutureWarning, match="renamed `edit_strength`"):
        old = one_step(trained, x, strength=0.5)
    assert torch.equal(old, one_step(trained, x, edit_strength=0.5))
    with pytest.raises(TypeError, match="not both"), pytest.warns(FutureWarning):
        one_step(trained, x, strength=0.5, edit_strength=0.25)
    with pytest.raises(TypeError, match="unexpected keyword"):
        one_step(trained, x, strenght=0.5)


def test_adapter_mix_weights_and_masks(trained):
    x = random_images(2, seed=9)
    trained.set_adapters("blue")
    blue = one_step(trained, x)
    trained.set_adapters("square")
    square = one_step(trained, x)
    trained.set_adapters("blue")
    original = one_step(trained, x, edit_strength=0.0)
    torch.testing.assert_close(one_step(trained, x, adapters={"blue": 1.0, "square": 0.0}), blue)
    mixed = one_step(trained, x, adapters={"blue": 0.3, "square": 0.7})
    torch.testing.assert_close(mixed, 0.3 * blue + 0.7 * square, atol=1e-5, rtol=1e-5)
    # a spatial mask: the left half gets the blue adapter, the right half keeps the original prediction
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1.0
    local = one_step(trained, x, adapters={"blue": 1.0}, adapter_masks={"blue": mask})
    torch.testing.assert_close(local[..., :8], blue[..., :8])
    torch.testing.assert_close(local[..., 8:], original[..., 8:])


def test_time_dependent_weights_are_called_per_step(trained):
    seen = []

    def gamma(t):
        seen.append(t)
        return 1.0 if t >= 100 else 0.0

    trained.edit(latents=random_images(1), t0=200, num_inference_steps=3, adapters={"blue": gamma}, output_type="pt")
    assert seen == [200, 100, 0]


def test_mix_is_batch_safe(trained):
    x = random_images(2, seed=4)
    kw = dict(adapters={"blue": 0.5, "square": 0.5}, t0=100, num_inversion_steps=2, num_inference_steps=2)
    batch = trained.edit(x, output_type="pt", **kw).images
    singles = torch.cat([trained.edit(x[i : i + 1], output_type="pt", **kw).images for i in range(2)])
    torch.testing.assert_close(batch, singles, atol=1e-5, rtol=1e-5)


def test_piecewise_weights_like_hybrid_config():
    w = piecewise_weights({0: {"blue": 3, "square": 7}, 300: {"blue": 1, "square": 0}})
    assert (w["blue"](999), w["square"](999)) == (1.0, 0.0)
    assert (w["blue"](300), w["square"](300)) == (1.0, 0.0)
    assert w["blue"](299) == pytest.approx(0.3) and w["square"](0) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="must name"):
        piecewise_weights({300: {"blue": 1}, 0: {"square": 1}})
    with pytest.raises(ValueError, match="cover t = 0"):
        piecewise_weights({300: {"blue": 1}})
    with pytest.raises(ValueError, match="positive"):
        piecewise_weights({0: {"blue": 0}})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(adapters={"green": 1.0}), "not loaded"),
        (dict(adapters={}), "non-empty dict"),
        (dict(adapters={"blue": "a lot"}), r"`adapters\['blue'\]`"),
        (dict(adapters={"blue": 1.0}, edit_strength=0.5), "either `edit_strength`"),
        (dict(adapter_masks={"blue": torch.ones(16, 16)}), "needs `adapters`"),
        (dict(adapters={"blue": 1.0}, adapter_masks={"square": torch.ones(16, 16)}), "not in `adapters`"),
        (dict(adapters={"blue": 1.0}, adapter_masks={"blue": torch.ones(8, 8)}), "H = W = 16"),
        (dict(adapters={"blue": 1.0}, adapter_masks={"blue": torch.full((16, 16), 2.0)}), r"\[0, 1\]"),
        (dict(edit_strength="max"), "`edit_strength`"),
    ],
)
def test_mix_validation(trained, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        trained.edit(latents=random_images(1), t0=100, num_inference_steps=2, **kwargs)

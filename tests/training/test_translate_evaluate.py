import numpy as np
import pytest
import torch
from conftest import make_pipeline, random_images

from diffusionclip_pipeline import CLIPDirectionalLoss
from diffusionclip_pipeline.evaluation import directional_clip_similarity, mean_absolute_error, ssim

KW = dict(t0=100, n_iter=2, num_denoise_steps=2, num_inversion_steps=2, num_inference_steps=2, output_type="pt")


def test_translate_seeded_and_without_adapter_returns_domain_images():
    pipe = make_pipeline()
    x = random_images(2)
    a = pipe.translate(x, generator=torch.Generator().manual_seed(0), **KW)
    b = pipe.translate(x, generator=torch.Generator().manual_seed(0), **KW)
    c = pipe.translate(x, generator=torch.Generator().manual_seed(1), **KW)
    assert a.images.shape == (2, 3, 16, 16)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert torch.equal(a.images, a.domain_images)  # no adapter: nothing to edit


def test_translate_edits_with_active_adapter():
    pipe = make_pipeline()
    pipe.finetune("red circle", "blue circle", images=random_images(2), t0=100, num_inversion_steps=2,
                  num_train_steps=2, num_epochs=1, learning_rate=2e-2)  # fmt: skip
    out = pipe.translate(random_images(1), generator=torch.Generator().manual_seed(0), **KW)
    assert not torch.equal(out.images, out.domain_images)
    # the domain images come from the original model: the same as with the adapter disabled
    pipe.disable_lora()
    plain = pipe.translate(random_images(1), generator=torch.Generator().manual_seed(0), **KW)
    torch.testing.assert_close(plain.domain_images, out.domain_images)
    # the final edit's inversion takes the fixed-point refinements: the same as editing the domain images so
    pipe.enable_lora()
    refined = pipe.translate(random_images(1), generator=torch.Generator().manual_seed(0),
                             num_fixed_point_iterations=2, **KW)  # fmt: skip
    edit_kw = {k: KW[k] for k in ("t0", "num_inversion_steps", "num_inference_steps", "output_type")}
    expected = pipe.edit(refined.domain_images * 2 - 1, num_fixed_point_iterations=2, **edit_kw).images
    torch.testing.assert_close(refined.images, expected)
    assert not torch.allclose(refined.images, out.images)


@pytest.mark.parametrize("kwargs, match", [(dict(n_iter=0), "`n_iter`"), (dict(num_denoise_steps=-1), "`num_denoise")])
def test_translate_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_pipeline().translate(random_images(1), **{**KW, **kwargs})


def test_mae_and_ssim_exact_values():
    a = np.full((16, 16, 3), 0.25, np.float32)
    b = np.full((16, 16, 3), 0.75, np.float32)
    assert mean_absolute_error(a, b) == pytest.approx(0.5)
    assert mean_absolute_error([a, a], [a, a]) == 0.0
    # constant images: SSIM = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) since both variances are 0
    c1 = 0.01**2
    assert ssim(a, b) == pytest.approx((2 * 0.25 * 0.75 + c1) / (0.25**2 + 0.75**2 + c1), rel=1e-5)
    x = random_images(2)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-5)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert ssim(x, noisy) < 0.9
    with pytest.raises(ValueError, match="differ in shape"):
        mean_absolute_error(random_images(2), random_images(3))


def test_directional_clip_similarity_is_one_minus_directional_loss(clip_model, tokenizer):
    loss_fn = CLIPDirectionalLoss(clip_model, tokenizer, templates=("a {}.",))
    src, edited = random_images(3, seed=0), random_images(3, seed=1)
    s_dir = directional_clip_similarity(loss_fn, src, edited, "red circle", "blue circle")
    assert s_dir == pytest.approx(1 - loss_fn(src, edited, "red circle", "blue circle").item(), abs=1e-5)

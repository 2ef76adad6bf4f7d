"""EffDiff's one-step scheme and noise encoding (Starodubcev et al., arXiv 2304.04344) in `finetune`."""

import torch
from conftest import make_pipeline, random_images

from diffusionclip_pipeline import lora
from diffusionclip_pipeline.training.losses import CLIPDirectionalLoss

ONE_STEP = dict(scheme="one_step", t0=100, num_inversion_steps=3, num_epochs=2, batch_size=2, learning_rate=1e-2)


def count_forwards(unet):
    images = []
    unet.register_forward_hook(lambda module, args, out: images.append(args[0].shape[0]))
    return images


def test_one_step_makes_one_forward_per_image_per_epoch():
    pipe = make_pipeline()
    images = count_forwards(pipe.unet)
    pipe.finetune("red circle", "blue circle", images=random_images(4), **ONE_STEP)
    # 3 inversion steps for 4 images (one batch of 2 twice), then 2 epochs x 4 images, then the final finiteness check
    assert images == [2] * 6 + [2] * 4 + [1]


def test_noise_encoding_makes_no_inversion_call():
    pipe = make_pipeline()
    images = count_forwards(pipe.unet)
    pipe.finetune("red circle", "blue circle", images=random_images(4), encoding="noise", **ONE_STEP)
    assert images == [2] * 4 + [1]


def test_one_step_loss_is_the_directional_and_l1_loss_on_the_one_call_x0_hat():
    pipe = make_pipeline()
    x = random_images(1, seed=3)
    settings = dict(ONE_STEP, num_epochs=1, batch_size=1, clip_num_augmentations=0, l1_loss_weight=0.6)
    x_t0 = pipe.invert(x, t0=100, num_inversion_steps=3).x_t0
    with torch.no_grad():  # the loss of the first (and only) step, before any update: the base UNet's x0_hat
        eps = pipe.unet(x_t0, torch.tensor(100)).sample
        a = pipe.scheduler.alphas_cumprod[100]
        x0_hat = (x_t0 - (1 - a) ** 0.5 * eps) / a**0.5
        clip = CLIPDirectionalLoss(pipe.clip_model, pipe.clip_tokenizer)
        expected = clip(x, x0_hat, "red circle", "blue circle") + 0.6 * (x - x0_hat).abs().mean()
    out = pipe.finetune("red circle", "blue circle", images=x, **settings)
    assert len(out.loss_history) == 1
    torch.testing.assert_close(torch.tensor(out.loss_history[0]), expected, atol=1e-5, rtol=1e-5)
    assert lora.get_provenance(pipe.unet, "default")["scheme"] == "one_step"

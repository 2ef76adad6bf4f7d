"""Components as diffusers users pass them (issue 29, item 8): the other autoencoder classes as ``vae``, optional
components that stay optional, and the CLIP location saved with the pipeline."""

import json

import pytest
import torch
from conftest import make_pipeline, make_sd_components, random_images
from diffusers import AsymmetricAutoencoderKL, AutoencoderTiny

from diffusionclip_pipeline import DiffusionCLIPPipeline

EDIT = {"t0": 100, "num_inversion_steps": 2, "num_inference_steps": 2, "output_type": "pt"}


def tiny_taesd():
    torch.manual_seed(0)
    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1), latent_channels=4,
    ).eval()  # fmt: skip


def tiny_asymmetric():
    torch.manual_seed(0)
    return AsymmetricAutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), down_block_out_channels=(8, 16),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), up_block_out_channels=(8, 16),
        layers_per_down_block=1, layers_per_up_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
    ).eval()  # fmt: skip


@pytest.mark.parametrize("make_vae", [tiny_taesd, tiny_asymmetric])
def test_other_autoencoder_classes_work_as_the_vae(make_vae):
    vae = make_vae()
    pipe = DiffusionCLIPPipeline(**{**make_sd_components(), "vae": vae})
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 2 and pipe.resolution == 16
    x = random_images(1)
    with torch.no_grad():  # the pipeline's encode is the autoencoder's own, scaled (TAESD: scaling 1)
        z = vae.encode(x)
        raw = z.latents if isinstance(vae, AutoencoderTiny) else z.latent_dist.mean
        torch.testing.assert_close(pipe.encode_image(x), raw * vae.config.scaling_factor)
    out = pipe(x, **EDIT)
    assert out.images.shape == (1, 3, 16, 16) and torch.isfinite(out.images).all()


def test_the_clip_location_is_saved_with_the_pipeline(tmp_path):
    pipe = make_pipeline(with_clip=False)
    pipe.clip_model_name_or_path = "/models/clip-vit-b16"
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["clip_model_name_or_path"] == "/models/clip-vit-b16"
    again = DiffusionCLIPPipeline.from_pretrained(tmp_path / "pipe")
    assert again.clip_model_name_or_path == "/models/clip-vit-b16"
    assert again.clip_model is None and again.vae is None  # saved as None, reloaded as None
    with pytest.raises(ValueError, match="`clip_model_name_or_path` must be a non-empty string"):
        again.clip_model_name_or_path = ""


def test_the_stock_conveniences_delegate_to_the_components_or_refuse():
    pipe = DiffusionCLIPPipeline(**make_sd_components())
    pipe.set_progress_bar_config(disable=True)
    x = random_images(1)
    plain = pipe(x, **EDIT).images
    pipe.enable_vae_slicing()
    assert pipe.vae.use_slicing
    torch.testing.assert_close(pipe(x, **EDIT).images, plain)  # slicing one image changes nothing
    pipe.disable_vae_slicing()
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert pipe.unet.up_blocks[0].b1 == 1.2
    assert not torch.equal(pipe(x, **EDIT).images, plain)
    pipe.disable_freeu()
    torch.testing.assert_close(pipe(x, **EDIT).images, plain)
    pixel = make_pipeline(with_clip=False)
    with pytest.raises(ValueError, match="`enable_freeu` needs a `unet` that has it"):
        pixel.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    with pytest.raises(ValueError, match="`enable_vae_slicing`|`enable_slicing` needs a `vae`"):
        pixel.enable_vae_slicing()

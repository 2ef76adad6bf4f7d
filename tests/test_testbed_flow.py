"""The flow-matching test-bed shipped with the package: a tiny Stable-Diffusion-3-shaped model of the shapes world.

The folder must be the stock `StableDiffusion3Pipeline` layout (loaded offline, without T5, as diffusers documents for
SD3) and the stock pipeline must draw a caption's colour and shape. Also the exact maths of the training shortcut
(scripts/testbed/train_flow.py): one zero token with attention multiplicity 256 is the stock call's 256 zero tokens.
"""

import json
import os
import sys

import numpy as np
import torch
from safetensors import safe_open

import diffusionclip_pipeline.testbed as testbed
from diffusionclip_pipeline.testbed import world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOW_WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(testbed.__file__)), "weights_flow")
SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def _bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _config(sub):
    name = "scheduler_config.json" if sub == "scheduler" else "config.json"
    with open(os.path.join(FLOW_WEIGHTS_DIR, sub, name)) as f:
        return json.load(f)


def _stock_pipeline():
    from diffusers import StableDiffusion3Pipeline

    sd = StableDiffusion3Pipeline.from_pretrained(
        FLOW_WEIGHTS_DIR, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32
    )
    sd.set_progress_bar_config(disable=True)
    return sd


def test_shipped_flow_folder_is_small_and_stable_diffusion_3_shaped():
    assert _bytes(FLOW_WEIGHTS_DIR) <= 10 * 1024**2
    with open(os.path.join(FLOW_WEIGHTS_DIR, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["text_encoder"] == index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["text_encoder_3"] == index["tokenizer_3"] == [None, None]
    for sub in SUBFOLDERS:
        assert os.path.isdir(os.path.join(FLOW_WEIGHTS_DIR, sub)), sub
    with safe_open(os.path.join(FLOW_WEIGHTS_DIR, "transformer", "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


def test_the_components_configs_fit_together():
    transformer, vae = _config("transformer"), _config("vae")
    te, te2 = _config("text_encoder"), _config("text_encoder_2")
    # 32 px images -> 8 x 8 x 4 latents -> 16 tokens of 2 x 2 patches
    assert (transformer["sample_size"], transformer["patch_size"], transformer["in_channels"]) == (8, 2, 4)
    assert vae["latent_channels"] == transformer["in_channels"] == transformer["out_channels"]
    assert 2 ** (len(vae["block_out_channels"]) - 1) * transformer["sample_size"] == world.DEFAULT_SIZE
    # the pipeline concatenates the two CLIPs' hidden states (context) and projected pooled outputs
    assert transformer["joint_attention_dim"] == te["hidden_size"] + te2["hidden_size"]
    assert transformer["pooled_projection_dim"] == te["projection_dim"] + te2["projection_dim"]
    # SD3 decodes latents / scaling_factor + shift_factor: both must be numbers
    assert isinstance(vae["shift_factor"], float) and vae["scaling_factor"] > 0
    assert _config("scheduler")["shift"] > 0


def test_stock_pipeline_loads_offline_and_draws_the_captions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import SD3Transformer2DModel

    sd = _stock_pipeline()
    assert isinstance(sd.transformer, SD3Transformer2DModel) and sd.text_encoder_3 is None
    pairs = [(c, s) for c in world.COLOURS for s in world.SHAPES]
    images = sd([world.caption(c, s) for c, s in pairs], num_inference_steps=28, guidance_scale=1.0,
                output_type="np", generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert images.shape == (len(pairs), 32, 32, 3)
    right = []
    for im, (colour, shape) in zip((images * 255).round().astype(np.uint8), pairs):
        rep = world.clean_shape_report(im)
        right.append(bool(rep["clean"] and rep["colour"] == colour and world.classify_shape(im)[0] == shape))
    assert np.mean(right) >= 0.8, right  # the target for captioned samples


def test_stock_pipeline_same_seed_same_images():
    sd = _stock_pipeline()

    def draw(seed):
        return sd(["a red circle", "a blue square"], num_inference_steps=4, output_type="np",
                  generator=torch.Generator().manual_seed(seed)).images  # fmt: skip

    a = draw(3)
    np.testing.assert_array_equal(a, draw(3))
    assert not np.array_equal(a, draw(4))


def test_one_zero_token_with_log_multiplicity_is_the_stock_256_zero_tokens():
    sys.path.insert(0, os.path.join(ROOT, "scripts", "testbed"))
    from train_flow import T5_TOKENS, ZeroTokensAttnProcessor, build_transformer

    torch.manual_seed(0)
    model = build_transformer(layers=2, heads=2, head_dim=8).eval()
    for p in model.parameters():  # non-zero everywhere, so no block is an identity by initialisation
        torch.nn.init.normal_(p, std=0.1)
    x, t, pooled = torch.randn(2, 4, 8, 8), torch.tensor([900.0, 40.0]), torch.randn(2, 128)
    clip = torch.randn(2, 16, 128)
    with torch.no_grad():
        stock = model(x, timestep=t, pooled_projections=pooled,
                      encoder_hidden_states=torch.cat([clip, torch.zeros(2, T5_TOKENS, 128)], 1)).sample  # fmt: skip
        short = torch.cat([clip, torch.zeros(2, 1, 128)], 1)
        plain = model(x, timestep=t, pooled_projections=pooled, encoder_hidden_states=short).sample
        model.set_attn_processor(ZeroTokensAttnProcessor(T5_TOKENS))
        fast = model(x, timestep=t, pooled_projections=pooled, encoder_hidden_states=short).sample
    torch.testing.assert_close(fast, stock, atol=1e-5, rtol=1e-5)
    assert (plain - stock).abs().max() > 1e-3  # without the multiplicity the single token is not the 256


def test_multiplicity_one_is_the_stock_processor():
    sys.path.insert(0, os.path.join(ROOT, "scripts", "testbed"))
    from train_flow import ZeroTokensAttnProcessor, build_transformer

    torch.manual_seed(1)
    model = build_transformer(layers=2, heads=2, head_dim=8).eval()
    x, t, pooled, ctx = (
        torch.randn(2, 4, 8, 8),
        torch.tensor([500.0, 5.0]),
        torch.randn(2, 128),
        torch.randn(2, 5, 128),
    )
    with torch.no_grad():
        stock = model(x, timestep=t, pooled_projections=pooled, encoder_hidden_states=ctx).sample
        model.set_attn_processor(ZeroTokensAttnProcessor(1))  # log(1) = 0: no bias
        fast = model(x, timestep=t, pooled_projections=pooled, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(fast, stock, atol=1e-5, rtol=1e-5)

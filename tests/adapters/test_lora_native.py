"""diffusers' LoRA contracts (issue 29, items 2 and 10): `lora_state_dict`, loading from a state dict and from kohya /
A1111 files, the class-method `save_lora_weights(unet_lora_layers=...)` of diffusers' training scripts, and
`save_lora_weights(format="kohya")`; each checked against diffusers' own loaders as the independent reference."""

from __future__ import annotations

import pytest
import torch
from conftest import make_pipeline, make_sd_components
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from diffusionclip_pipeline import DiffusionCLIPPipeline
from diffusionclip_pipeline.loaders import lora_state

TARGETS = ("to_q", "to_v", "conv1")


def sd_pipe(seed: int = 0) -> DiffusionCLIPPipeline:
    pipe = DiffusionCLIPPipeline(**make_sd_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_adapter(pipe, name="smile", rank=2, alpha=4.0, seed=0):
    lora_state.add_adapter(pipe.unet, lora_state.LoraSettings(rank, alpha, TARGETS), name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in pipe.unet.named_parameters():
            if "lora_" in key and f".{name}." in key:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    pipe.set_adapters([name])
    return pipe


@torch.no_grad()
def unet_output(unet, seed=3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    hidden = torch.randn(1, 40, 32, generator=generator)
    return unet(x, torch.tensor(400), encoder_hidden_states=hidden).sample


def layers(pipe, name="smile"):
    return {f"unet.{k}": v for k, v in get_peft_model_state_dict(pipe.unet, adapter_name=name).items()}


def test_lora_state_dict_returns_prefixed_weights_and_the_config(tmp_path):
    pipe = with_adapter(sd_pipe())
    pipe.save_lora_weights(tmp_path / "a", adapter_name="smile")
    state_dict, alphas = DiffusionCLIPPipeline.lora_state_dict(tmp_path / "a")
    assert alphas is None and state_dict.keys() == layers(pipe).keys()
    assert all(torch.equal(state_dict[k], v) for k, v in layers(pipe).items())
    _, _, metadata = DiffusionCLIPPipeline.lora_state_dict(tmp_path / "a", return_lora_metadata=True)
    assert (metadata["r"], metadata["lora_alpha"], sorted(metadata["target_modules"])) == (2, 4.0, sorted(TARGETS))


def test_a_state_dict_loads_with_its_config(tmp_path):
    source = with_adapter(sd_pipe())
    config = source.unet.peft_config["smile"].to_dict()
    pipe = sd_pipe()
    assert pipe.load_lora_weights(layers(source), adapter_name="smile", lora_adapter_metadata=config) == "smile"
    torch.testing.assert_close(unet_output(pipe.unet), unet_output(source.unet), rtol=0, atol=0)


def test_a_state_dict_without_config_loads_as_diffusers_reads_it():
    """No `LoraConfig`: the rank from the weights and alpha = rank, as diffusers loads such a file."""
    source = with_adapter(sd_pipe(), alpha=4.0)
    pipe = sd_pipe()
    pipe.load_lora_weights(layers(source), adapter_name="smile")
    reference = sd_pipe()
    reference.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=list(TARGETS)), adapter_name="smile")
    reference.unet.load_state_dict({**reference.unet.state_dict(), **_peft_keys(source)}, strict=True)
    torch.testing.assert_close(unet_output(pipe.unet), unet_output(reference.unet), rtol=0, atol=1e-6)
    assert float((unet_output(pipe.unet) - unet_output(source.unet)).abs().max()) > 1e-4  # scale 1, not 2


def _peft_keys(pipe, name="smile"):
    """``pipe.unet``'s adapter weights under the state-dict names peft gives ``name``'s layers."""
    return {k: v for k, v in pipe.unet.state_dict().items() if "lora_" in k and f".{name}." in k}


def test_the_class_method_form_writes_what_diffusers_and_we_load(tmp_path):
    source = with_adapter(sd_pipe())
    config = source.unet.peft_config["smile"].to_dict()
    path = DiffusionCLIPPipeline.save_lora_weights(
        tmp_path / "scripts", unet_lora_layers=layers(source), unet_lora_adapter_metadata=config
    )
    assert path.endswith("pytorch_lora_weights.safetensors")
    ours = sd_pipe()
    ours.load_lora_weights(tmp_path / "scripts", adapter_name="smile")
    stock = StableDiffusionPipeline(**make_sd_components(0), safety_checker=None, feature_extractor=None)
    stock.load_lora_weights(tmp_path / "scripts", adapter_name="smile")
    expected = unet_output(source.unet)
    torch.testing.assert_close(unet_output(ours.unet), expected, rtol=0, atol=0)
    torch.testing.assert_close(unet_output(stock.unet), expected, rtol=0, atol=1e-6)
    # on an instance, `*_lora_layers` takes the same path (keys without the prefix are prefixed)
    unprefixed = {k.removeprefix("unet."): v for k, v in layers(source).items()}
    sd_pipe().save_lora_weights(tmp_path / "instance", unet_lora_layers=unprefixed, unet_lora_adapter_metadata=config)
    assert load_file(tmp_path / "instance" / "pytorch_lora_weights.safetensors").keys() == layers(source).keys()


def test_kohya_files_round_trip_and_load_in_diffusers(tmp_path):
    source = with_adapter(sd_pipe(), rank=2, alpha=4.0)
    path = source.save_lora_weights(tmp_path, adapter_name="smile", format="kohya")
    tensors = load_file(path)
    assert path.endswith("smile.safetensors") and all(k.startswith("lora_unet_") for k in tensors)
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {4.0}  # the real alpha, not the rank
    expected = unet_output(source.unet)
    ours = sd_pipe()
    ours.load_lora_weights(path, adapter_name="smile")
    torch.testing.assert_close(unet_output(ours.unet), expected, rtol=0, atol=1e-6)
    stock = StableDiffusionPipeline(**make_sd_components(0), safety_checker=None, feature_extractor=None)
    stock.load_lora_weights(path, adapter_name="smile")  # diffusers' kohya loader, the independent reader
    torch.testing.assert_close(unet_output(stock.unet), expected, rtol=0, atol=1e-5)


def test_errors_name_the_argument(tmp_path):
    pipe = with_adapter(sd_pipe())
    with pytest.raises(ValueError, match="`format` must be one of"):
        pipe.save_lora_weights(tmp_path, adapter_name="smile", format="a1111")
    with pytest.raises(ValueError, match="exactly one of `unet_lora_layers` and `transformer_lora_layers`"):
        DiffusionCLIPPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers(pipe), transformer_lora_layers={})
    with pytest.raises(ValueError, match="must all start with one of"):
        sd_pipe().load_lora_weights({"text_encoder.x.lora_A.weight": torch.zeros(2, 4)})
    with pytest.raises(TypeError, match="key strings to tensors"):
        sd_pipe().load_lora_weights({"unet.x.lora_A.weight": [0.0]})
    with pytest.raises(TypeError, match="`path` must be"):
        sd_pipe().load_lora_weights(3)
    kohya = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 32)}
    with pytest.raises(ValueError, match="also adapts the text encoder"):
        sd_pipe().load_lora_weights(kohya)
    from conftest import make_sd3_components

    flow = DiffusionCLIPPipeline(**make_sd3_components(0))
    lora_state.add_adapter(flow.transformer, lora_state.LoraSettings(2, 2.0, ("to_q",)), "a")
    with pytest.raises(ValueError, match="kohya.*UNet adapters"):
        flow.save_lora_weights(tmp_path, adapter_name="a", format="kohya")


def test_a_pixel_unet_adapter_state_dict_round_trips(tmp_path):
    """The pixel `UNet2DModel` (the adapter API bound by this package) takes the same state-dict path."""
    source = make_pipeline()
    lora_state.add_adapter(source.unet, lora_state.LoraSettings(2, 2.0, ("to_q", "conv1")), "a")
    with torch.no_grad():
        for key, p in source.unet.named_parameters():
            if "lora_B" in key:
                p.fill_(0.05)
    source.set_adapters(["a"])
    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(source.unet, adapter_name="a").items()}
    pipe = make_pipeline()
    pipe.load_lora_weights(state, adapter_name="a")
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, 300).sample, source.unet(x, 300).sample, rtol=0, atol=0)


def test_bypassing_the_adapters_keeps_their_trainability():
    """An inversion (the original model) in the middle of training must not freeze the adapter being trained."""
    pipe = with_adapter(sd_pipe())
    lora = [p for name, p in pipe.unet.named_parameters() if "lora_" in name]
    for p in lora:
        p.requires_grad_(True)
    with lora_state.adapters_disabled(pipe.unet):
        pass
    assert all(p.requires_grad for p in lora)
    for p in lora:
        p.requires_grad_(False)
    with lora_state.adapters_disabled(pipe.unet):
        pass
    assert not any(p.requires_grad for p in lora)

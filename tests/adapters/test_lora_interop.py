"""diffusers-format LoRA files from other tools (issue 29, item 2, part): a file without `lora_adapter_metadata`, as
older diffusers training scripts write it, loads as diffusers loads it (rank from the weights, alpha = rank)."""

import pytest
import torch
from conftest import make_sd_components
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from diffusionclip_pipeline import DiffusionCLIPPipeline
from diffusionclip_pipeline.loaders import lora_state


def stock_with_a_lora(tmp_path, rank=2, alpha=2):
    stock = StableDiffusionPipeline(
        **make_sd_components(), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    torch.manual_seed(0)
    stock.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_v"]))
    with torch.no_grad():  # a trained-looking adapter (B starts at zero)
        for name, parameter in stock.unet.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.3)
    layers = get_peft_model_state_dict(stock.unet)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=layers)
    return stock


def test_a_file_without_lora_metadata_loads_as_diffusers_loads_it(tmp_path):
    stock_with_a_lora(tmp_path)
    file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        assert "lora_adapter_metadata" not in (handle.metadata() or {})  # as older scripts write it
    components = make_sd_components()
    ours = DiffusionCLIPPipeline(**components)
    name = ours.load_lora_weights(tmp_path / "lora")
    assert lora_state.adapter_settings(ours.unet, name).alpha == 2.0
    theirs = StableDiffusionPipeline(
        **make_sd_components(), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    theirs.load_lora_weights(tmp_path / "lora")
    sample, hidden = torch.randn(1, 4, 8, 8), ours.encode_prompt("a", 1)
    with torch.no_grad():
        mine = ours.unet(sample, torch.tensor(10), encoder_hidden_states=hidden).sample
        stock = theirs.unet(sample, torch.tensor(10), encoder_hidden_states=hidden).sample
        ours.disable_lora()
        base = ours.unet(sample, torch.tensor(10), encoder_hidden_states=hidden).sample
    torch.testing.assert_close(mine, stock, atol=1e-5, rtol=0)
    assert (mine - base).abs().max() > 1e-4


def test_a_file_without_metadata_and_mixed_ranks_is_refused(tmp_path):
    stock_with_a_lora(tmp_path)
    file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    tensors = load_file(file)
    key = sorted(k for k in tensors if k.endswith("lora_A.weight"))[0]
    tensors[key] = torch.zeros(3, tensors[key].shape[1])
    tensors[key.replace("lora_A", "lora_B")] = torch.zeros(tensors[key.replace("lora_A", "lora_B")].shape[0], 3)
    save_file(tensors, file)
    ours = DiffusionCLIPPipeline(**make_sd_components())
    with pytest.raises(ValueError, match="different ranks"):
        ours.load_lora_weights(tmp_path / "lora")
    assert ours.lora_adapters == []

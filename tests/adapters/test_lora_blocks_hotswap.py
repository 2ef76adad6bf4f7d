"""diffusers' LoRA contracts (issue 29): per-block weights in `set_adapters`, `load_lora_weights(hotswap=True)` and
`load_lora_weights(low_cpu_mem_usage=True)`, each checked against an independent reference (LoRA weights zeroed by
hand, diffusers' own `set_adapters`, a fresh load)."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    add_random_adapter,
    make_conditional_unet,
    make_pipeline,
    make_sd3_components,
    make_sd_components,
    make_sdxl_components,
)
from peft import LoraConfig
from safetensors.torch import load_file

from diffusionclip_pipeline import DiffusionCLIPPipeline
from diffusionclip_pipeline.loaders import lora_file, lora_state

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # LoRA in attention layers only: "down" is every down-block LoRA
FAMILIES = ("pixel", "sd", "sdxl")
UP_ATTENTION_BLOCK = {"pixel": 0, "sd": 1, "sdxl": 0}  # an up block with attention layers in each toy UNet


def make(family: str, seed: int = 0) -> DiffusionCLIPPipeline:
    if family == "pixel":
        return make_pipeline(seed=seed, with_clip=False)
    components = {"sd": make_sd_components, "sdxl": make_sdxl_components, "sd3": make_sd3_components}[family](seed)
    pipe = DiffusionCLIPPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def denoise(pipe, seed: int = 3) -> torch.Tensor:
    """One call of the denoiser on fixed random inputs of its family."""
    model, g = pipe.denoiser, torch.Generator().manual_seed(seed)
    if type(model).__name__ == "UNet2DModel":
        return model(torch.randn(1, 3, 16, 16, generator=g), 300).sample
    if type(model).__name__ == "SD3Transformer2DModel":
        x, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 12, 32, generator=g)
        pooled = torch.randn(1, 32, generator=g)
        return model(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.tensor([300.0])).sample
    width = model.config.cross_attention_dim
    x, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 12, width, generator=g)
    extra = {}
    if model.config.addition_embed_type == "text_time":
        extra = {
            "added_cond_kwargs": {
                "text_embeds": torch.randn(1, 32, generator=g),
                "time_ids": torch.rand(1, 6, generator=g),
            }
        }
    return model(x, 300, encoder_hidden_states=text, **extra).sample


def lora_tensors(model, name: str = "a") -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k and f".{name}." in k}


def with_adapter(family: str, targets=ATTENTION, seed: int = 0, rank: int = 2, alpha: float = 4.0, name="a"):
    pipe = make(family)
    add_random_adapter(pipe, name, rank=rank, alpha=alpha, seed=seed, targets=targets)
    pipe.set_adapters(name)
    return pipe


def zero_lora_b(model, prefix: str) -> None:
    """The independent reference: the LoRA of the modules under ``prefix`` removed by hand (B = 0)."""
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.startswith(prefix) and ".lora_B." in key:
                p.zero_()


# ---- per-block weights ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_down_zero_is_the_lora_removed_from_the_down_blocks(family):
    pipe, reference = with_adapter(family), with_adapter(family)
    pipe.denoiser.set_adapters(["a"], [1.0])  # diffusers' own method first: it fills diffusers' expansion mapping
    full = denoise(pipe)
    pipe.set_adapters("a", {"down": 0.0, "mid": 1.0, "up": 1.0})
    zero_lora_b(reference.denoiser, "down_blocks.")
    assert any(k.startswith("down_blocks.") for k in lora_tensors(pipe.denoiser))  # the down blocks have LoRA
    torch.testing.assert_close(denoise(pipe), denoise(reference), rtol=0, atol=0)
    assert float((denoise(pipe) - full).abs().max()) > 1e-5  # that LoRA mattered
    block = UP_ATTENTION_BLOCK[family]
    pipe.set_adapters("a", {"up": {f"block_{block}": 0.0}})  # one block
    reference = with_adapter(family)
    zero_lora_b(reference.denoiser, f"up_blocks.{block}.")
    torch.testing.assert_close(denoise(pipe), denoise(reference), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_block_weights_equal_one_weight(family):
    pipe = with_adapter(family)
    pipe.set_adapters("a", 1.0)
    one = denoise(pipe)
    pipe.set_adapters("a", {"down": 1, "mid": 1, "up": 1})
    torch.testing.assert_close(denoise(pipe), one, rtol=0, atol=0)
    assert lora_state.adapter_weights(pipe.denoiser) == {"a": 1.0}
    pipe.set_adapters("a", 0.5)
    half = denoise(pipe)
    pipe.set_adapters(["a"], [{"down": 0.5, "mid": [0.5], "up": 0.5}])  # attention-only LoRA: every layer
    torch.testing.assert_close(denoise(pipe), half, rtol=0, atol=0)


def test_block_weights_are_diffusers_own():
    """With LoRA in the resnets too, and a weight per attention layer: diffusers' `set_adapters` on a stock
    `UNet2DConditionModel` (its expansion, its per-layer rule) is the reference."""
    targets = ("to_q", "to_v", "conv1")
    weights = {"down": 0.0, "mid": 0.25, "up": {"block_1": [1.5, 0.5]}}
    pipe = with_adapter("sd", targets=targets)
    pipe.set_adapters("a", weights)
    stock = make_conditional_unet(0)
    stock.add_adapter(LoraConfig(r=2, lora_alpha=4.0, target_modules=list(targets)), adapter_name="a")
    stock.load_state_dict({**stock.state_dict(), **lora_tensors(pipe.unet)})
    stock.set_adapters(["a"], [weights])

    class Stock:
        denoiser = stock

    torch.testing.assert_close(denoise(pipe), denoise(Stock), rtol=0, atol=0)
    assert lora_state.adapter_weights(pipe.unet) == {"a": weights}


def test_block_weights_survive_other_adapters_and_a_saved_folder(tmp_path):
    pipe = with_adapter("pixel", targets=ATTENTION + ("conv1",))
    add_random_adapter(pipe, "b", seed=1, targets=ATTENTION)
    pipe.set_adapters(["a", "b"], [{"down": 0.0, "up": {"block_0": [0.5, 2.0]}}, 0.75])
    expected = denoise(pipe)
    lora_file.save_adapters_folder(pipe.unet, str(tmp_path / "lora"))  # the index records the dict
    reloaded = make("pixel")
    lora_file.load_adapters_folder(reloaded.unet, str(tmp_path / "lora"))
    torch.testing.assert_close(denoise(reloaded), expected, rtol=0, atol=0)
    before = denoise(reloaded)
    reloaded.unload_lora_weights("b")  # "a" keeps its per-block weights
    source = with_adapter("pixel", targets=ATTENTION + ("conv1",))
    source.set_adapters("a", {"down": 0.0, "up": {"block_0": [0.5, 2.0]}})
    torch.testing.assert_close(denoise(reloaded), denoise(source), rtol=0, atol=0)
    assert float((denoise(reloaded) - before).abs().max()) > 1e-5


def test_block_weight_errors_change_nothing():
    pipe = with_adapter("sd")
    pipe.set_adapters("a", 0.5)
    state = lora_state.active_state(pipe.unet)
    bad = {
        "left": (ValueError, "'left'"),
        "block_0": (ValueError, r"'block_0'.*\['block_1'\]"),  # up block 0 of the toy SD UNet has no attention
        "length": (ValueError, "Expected 2 scales for up.block_1"),
        "value": (TypeError, r"adapter_weights\['down'\]"),
        "nan": (ValueError, r"adapter_weights\[0\]\['mid'\]"),
        "empty": (ValueError, "non-empty list"),
    }
    weights = {
        "left": {"left": 0.5},
        "block_0": {"up": {"block_0": 0.5}},
        "length": {"up": {"block_1": [1.0, 1.0, 1.0]}},
        "value": {"down": "half"},
        "nan": [{"mid": float("nan")}],
        "empty": {"up": {"block_1": []}},
    }
    for case, (error, message) in bad.items():
        with pytest.raises(error, match=message):
            pipe.set_adapters("a", weights[case])
        assert lora_state.active_state(pipe.unet) == state
    flow = make("sd3")
    add_random_adapter(flow, "a", targets=("to_q", "to_k"))
    flow.set_adapters("a", 0.5)
    state = lora_state.active_state(flow.transformer)
    with pytest.raises(ValueError, match="`adapter_weights`.*SD3Transformer2DModel"):
        flow.set_adapters("a", {"down": 0.0})
    assert lora_state.active_state(flow.transformer) == state


def test_block_weights_refused_for_lora_outside_the_blocks():
    """A LoRA layer outside down / mid / up blocks (``conv_in``): diffusers' rule fails there; refused first."""
    pipe = with_adapter("pixel", targets=("to_q", "conv_in"))
    state = lora_state.active_state(pipe.unet)
    with pytest.raises(ValueError, match="outside them.*conv_in"):
        pipe.set_adapters("a", {"down": 0.0})
    assert lora_state.active_state(pipe.unet) == state


# ---- hotswap -----------------------------------------------------------------------------------------------------


def saved(tmp_path, family, seed, rank=2, alpha=4.0, targets=("to_q", "to_k", "conv1"), name="b") -> str:
    source = with_adapter(family, targets=targets, seed=seed, rank=rank, alpha=alpha, name=name)
    return source.save_lora_weights(tmp_path / f"{name}-{seed}-{rank}-{alpha}", adapter_name=name)


def lora_objects(model) -> dict[str, int]:
    """The id of every LoRA layer, LoRA module and LoRA parameter, by name."""
    ids = {n: id(m) for n, m in model.named_modules() if "lora_" in n or isinstance(m, lora_state.BaseTunerLayer)}
    return {**ids, **{n: id(p) for n, p in model.named_parameters() if "lora_" in n}}


@pytest.mark.parametrize("family", ("pixel", "sd"))
def test_hotswap_equals_a_fresh_load_in_the_same_objects(tmp_path, family):
    file_a, file_b = saved(tmp_path, family, seed=1), saved(tmp_path, family, seed=2, alpha=1.0)  # alpha differs
    pipe = make(family)
    pipe.load_lora_weights(file_a, adapter_name="x")
    with_a = denoise(pipe)
    objects = lora_objects(pipe.denoiser)
    assert pipe.load_lora_weights(file_b, adapter_name="x", hotswap=True) == "x"
    fresh = make(family)
    fresh.load_lora_weights(file_b, adapter_name="x")
    torch.testing.assert_close(denoise(pipe), denoise(fresh), rtol=0, atol=0)
    assert float((denoise(pipe) - with_a).abs().max()) > 1e-5
    assert lora_objects(pipe.denoiser) == objects  # no layer created or replaced
    assert pipe.denoiser.peft_config["x"].lora_alpha == 1.0 and pipe.lora_adapters == ["x"]
    written = load_file(pipe.save_lora_weights(tmp_path / "swapped", adapter_name="x"))
    assert all(torch.equal(written[k], v) for k, v in load_file(file_b).items())  # the file says B, alpha 1


def test_hotswap_needs_no_recompile(tmp_path):
    """The point of hotswapping: a compiled denoiser runs the new weights without recompiling (dynamo's eager
    backend: the graph capture and its guards, without code generation)."""
    file_a, file_b = saved(tmp_path, "pixel", seed=1), saved(tmp_path, "pixel", seed=2)
    pipe = make("pixel")
    pipe.load_lora_weights(file_a, adapter_name="x")
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    try:
        pipe.unet.compile(backend="eager")  # in place, as a user compiles the pipeline's UNet
        with torch.no_grad():
            pipe.unet(x, 300)
        pipe.load_lora_weights(file_b, adapter_name="x", hotswap=True)
        with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
            swapped = pipe.unet(x, 300).sample
    finally:
        torch._dynamo.reset()
    fresh = make("pixel")
    fresh.load_lora_weights(file_b, adapter_name="x")
    with torch.no_grad():
        torch.testing.assert_close(swapped, fresh.unet(x, 300).sample, rtol=0, atol=0)


def test_hotswap_keeps_the_active_set_and_weights(tmp_path):
    file_a, file_b = saved(tmp_path, "pixel", seed=1), saved(tmp_path, "pixel", seed=2, alpha=8.0)
    pipe = make("pixel")
    pipe.load_lora_weights(file_a, adapter_name="x")
    add_random_adapter(pipe, "other", seed=5)
    pipe.set_adapters(["x", "other"], [{"down": 0.0, "up": 0.5}, 0.25])
    pipe.load_lora_weights(file_b, adapter_name="x", hotswap=True)
    fresh = make("pixel")
    fresh.load_lora_weights(file_b, adapter_name="x")
    add_random_adapter(fresh, "other", seed=5)
    fresh.set_adapters(["x", "other"], [{"down": 0.0, "up": 0.5}, 0.25])
    torch.testing.assert_close(denoise(pipe), denoise(fresh), rtol=0, atol=1e-6)
    assert pipe.get_active_adapters() == ["x", "other"]
    assert lora_state.adapter_weights(pipe.unet) == {"x": {"down": 0.0, "up": 0.5}, "other": 0.25}


def test_hotswap_errors_change_nothing(tmp_path):
    pipe = make("pixel")
    pipe.load_lora_weights(saved(tmp_path, "pixel", seed=1), adapter_name="x")
    before, objects = lora_tensors(pipe.unet, "x"), lora_objects(pipe.unet)
    cases = [
        (dict(adapter_name="y"), saved(tmp_path, "pixel", seed=2), "none named 'y'"),
        (dict(), saved(tmp_path, "pixel", seed=2), "pass its name as `adapter_name`"),
        (dict(adapter_name="x"), saved(tmp_path, "pixel", seed=2, rank=4), "its rank is 4, 'x''s is 2"),
        (dict(adapter_name="x"), saved(tmp_path, "pixel", seed=2, targets=("to_q", "conv1")), "targets differ"),
    ]
    for kwargs, path, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe.load_lora_weights(path, hotswap=True, **kwargs)
        assert lora_tensors(pipe.unet, "x").keys() == before.keys() and lora_objects(pipe.unet) == objects
        assert all(torch.equal(v, before[k]) for k, v in lora_tensors(pipe.unet, "x").items())
    with pytest.raises(TypeError, match="`hotswap` must be True or False"):
        pipe.load_lora_weights(saved(tmp_path, "pixel", seed=2), adapter_name="x", hotswap="yes")
    pipe.fuse_lora()
    with pytest.raises(ValueError, match="fused.*unfuse_lora"):
        pipe.load_lora_weights(saved(tmp_path, "pixel", seed=2), adapter_name="x", hotswap=True)
    with pytest.raises(NotImplementedError, match="enable_lora_hotswap"):
        pipe.enable_lora_hotswap(target_rank=8)


# ---- low_cpu_mem_usage -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ("pixel", "sd3"))
def test_low_cpu_mem_usage_loads_the_same_without_initialising(tmp_path, family):
    path = saved(tmp_path, family, seed=1, targets=("to_q", "to_k"))
    default, low = make(family), make(family)
    state = torch.random.get_rng_state()
    default.load_lora_weights(path, adapter_name="b")
    assert not torch.equal(torch.random.get_rng_state(), state)  # peft initialised A randomly, then overwrote it
    state = torch.random.get_rng_state()
    low.load_lora_weights(path, adapter_name="b", low_cpu_mem_usage=True)
    assert torch.equal(torch.random.get_rng_state(), state)  # created on the meta device: nothing initialised
    expected = lora_tensors(default.denoiser, "b")
    got = dict(low.denoiser.named_parameters())
    assert lora_tensors(low.denoiser, "b").keys() == expected.keys()
    assert all(torch.equal(got[k], v) and got[k].device == v.device and not got[k].requires_grad for k, v in
               expected.items())  # fmt: skip
    torch.testing.assert_close(denoise(low), denoise(default), rtol=0, atol=0)
    assert low.get_active_adapters() == default.get_active_adapters() == ["b"]


def test_low_cpu_mem_usage_must_be_a_bool(tmp_path):
    pipe = make("pixel")
    for bad in (1, "yes", None):
        with pytest.raises(TypeError, match="`low_cpu_mem_usage` must be True or False"):
            pipe.load_lora_weights(saved(tmp_path, "pixel", seed=1), low_cpu_mem_usage=bad)
    assert pipe.lora_adapters == []

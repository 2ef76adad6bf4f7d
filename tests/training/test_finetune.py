import math
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from conftest import make_clip, make_pipeline, make_tokenizer, make_unet, random_images
from diffusers import UNet2DModel
from safetensors.torch import save_file

from diffusionclip_pipeline import DiffusionCLIPPipeline, NoAdapterWarning, __version__
from diffusionclip_pipeline.image_processing import postprocess_image
from diffusionclip_pipeline.lora import adapter_parameters, base_state_dict, get_provenance, read_adapter_file
from diffusionclip_pipeline.training import FinetuneConfig, NonFiniteLossError, finetune
from diffusionclip_pipeline.training.losses import sparse_change

TINY = dict(t0=100, num_inversion_steps=3, num_train_steps=2, num_epochs=1, batch_size=2)
EDIT = dict(t0=100, num_inversion_steps=3, num_inference_steps=3, output_type="pt")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def adapter_state(pipe, name="default"):
    from peft.utils import get_peft_model_state_dict

    return {k: v.clone() for k, v in get_peft_model_state_dict(pipe.unet, adapter_name=name).items()}


def test_only_adapter_trains_and_base_is_bit_identical(pipe):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    out = pipe.finetune("red circle", "blue circle", images=random_images(2), **TINY)
    after = base_state_dict(pipe.unet)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert out.adapter_name == "default" and pipe.lora_adapters == ["default"]
    lora_b = [v for k, v in adapter_state(pipe).items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it moved
    assert len(out.loss_history) == 2  # efficient: one optimizer step per generation step
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_loss_decreases_on_fixed_batch():
    pipe = make_pipeline()
    out = pipe.finetune(
        "red circle",
        "blue circle",
        images=random_images(2),
        **{**TINY, "num_epochs": 6, "batch_size": 2},
        learning_rate=5e-3,
        l1_loss_weight=0.0,
    )
    first, last = out.loss_history[:2], out.loss_history[-2:]
    assert sum(last) < sum(first) - 0.05


def test_same_seed_same_adapter_and_scheme_full_chain():
    a, b = make_pipeline(), make_pipeline()
    kw = dict(images=random_images(2), scheme="full_chain", **TINY)
    out = a.finetune("red circle", "blue circle", **kw)
    b.finetune("red circle", "blue circle", **kw)
    assert len(out.loss_history) == 1  # full chain: one optimizer step per batch
    sa, sb = adapter_state(a), adapter_state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = make_pipeline()
    c.finetune("red circle", "blue circle", seed=1, **kw)
    assert any(not torch.equal(sa[k], v) for k, v in adapter_state(c).items())


def test_sparse_change_is_zero_at_no_change_and_penalises_spread_change_more():
    src = torch.zeros(1, 3, 4, 4)
    assert torch.equal(sparse_change(src, src), torch.zeros_like(src))
    value = sparse_change(torch.zeros(2), torch.tensor([0.06, -1.44]))
    torch.testing.assert_close(value, torch.tensor([0.07**0.5 - 0.1, 1.45**0.5 - 0.1]))
    # the same L1 budget: a faint change on every pixel costs more than a strong change on a few
    tint, blob = torch.full((1, 3, 4, 4), 0.1), torch.zeros(1, 3, 4, 4)
    blob[..., :1, :1] = 1.6
    torch.testing.assert_close((tint - src).abs().sum(), (blob - src).abs().sum())
    assert sparse_change(src, tint).sum() > 2 * sparse_change(src, blob).sum()


def test_sparse_loss_weight_adds_the_sparse_term():
    a, b = make_pipeline(), make_pipeline()
    kw = dict(images=random_images(2), clip_loss_weight=0.0, l1_loss_weight=1.0, **TINY)
    plain = a.finetune("red circle", "blue circle", sparse_loss_weight=0.0, **kw).loss_history
    sparse = b.finetune("red circle", "blue circle", sparse_loss_weight=1.0, **kw).loss_history
    # same first x0_hat (LoRA B starts at 0); the 2-step regeneration is not exact, so the term is > 0
    assert sparse[0] - plain[0] > 0.05
    with pytest.raises(ValueError, match="every loss weight is 0"):
        a.finetune("red circle", "blue circle", adapter_name="b", **{**kw, "l1_loss_weight": 0.0})


def test_gradient_checkpointing_gives_the_same_adapter():
    a, b = make_pipeline(), make_pipeline()
    a.finetune("red circle", "blue circle", images=random_images(2), **TINY)
    b.finetune("red circle", "blue circle", images=random_images(2), gradient_checkpointing=True, **TINY)
    sa, sb = adapter_state(a), adapter_state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not b.unet.is_gradient_checkpointing


def test_accumulating_two_batches_of_one_equals_one_batch_of_two():
    # no CLIP views: a batch of two draws its random views differently from two batches of one
    kw = dict(images=random_images(2), scheme="full_chain", clip_num_augmentations=0, **{**TINY, "num_epochs": 1})
    a, b = make_pipeline(), make_pipeline()
    a.finetune("red circle", "blue circle", **{**kw, "batch_size": 2})
    b.finetune("red circle", "blue circle", **{**kw, "batch_size": 1}, gradient_accumulation_steps=2)
    sa, sb = adapter_state(a), adapter_state(b)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=1e-6, rtol=1e-4)


def test_bf16_mixed_precision_after_fp32_in_one_process():
    pipe = make_pipeline()
    fp32 = pipe.finetune("red circle", "blue circle", images=random_images(2), adapter_name="a", **TINY)
    bf16 = pipe.finetune(
        "red circle", "blue circle", images=random_images(2), adapter_name="b", mixed_precision="bf16", **TINY
    )
    assert all(abs(x - y) < 0.05 for x, y in zip(fp32.loss_history, bf16.loss_history))
    assert pipe.unet.dtype == torch.float32


def test_edit_changes_and_save_load_reproduces_exactly(tmp_path):
    pipe = make_pipeline()
    x = random_images(1, seed=5)
    with pytest.warns(NoAdapterWarning):  # no adapter yet: a reconstruction
        base = pipe.edit(x, **EDIT).images
    pipe.finetune("red circle", "blue circle", images=random_images(2), learning_rate=2e-2, **TINY)
    edited = pipe.edit(x, **EDIT).images
    assert (edited - base).abs().max() > 1e-3
    path = pipe.save_lora_weights(tmp_path / "adapter")
    assert os.path.basename(path) == "pytorch_lora_weights.safetensors"
    saved = os.listdir(tmp_path / "adapter")  # the weights (and the model card): no temporary file left
    assert "pytorch_lora_weights.safetensors" in saved and not [f for f in saved if f.startswith(".")]

    fresh = make_pipeline()  # same base weights, new process state
    assert fresh.load_lora_weights(tmp_path / "adapter") == "default"
    assert torch.equal(fresh.edit(x, **EDIT).images, edited)
    fresh.disable_lora()
    with pytest.warns(NoAdapterWarning):
        assert torch.equal(fresh.edit(x, **EDIT).images, base)
    fresh.enable_lora()
    fresh.unload_lora_weights()
    with pytest.warns(NoAdapterWarning):
        assert fresh.lora_adapters == [] and torch.equal(fresh.edit(x, **EDIT).images, base)

    half = pipe.save_lora_weights(tmp_path / "half", dtype=torch.float16)
    assert os.path.getsize(half) < 0.6 * os.path.getsize(path)
    fresh_half = make_pipeline()
    fresh_half.load_lora_weights(half)
    assert fresh_half.unet.dtype == torch.float32
    torch.testing.assert_close(fresh_half.edit(x, **EDIT).images, edited, atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="`dtype`"):
        pipe.save_lora_weights(tmp_path / "bad", dtype=torch.int8)

    adapter = read_adapter_file(path)  # the provenance `finetune` recorded went into the file
    assert adapter.provenance["prompt_tar"] == "blue circle" and adapter.settings.rank == 4
    assert adapter.provenance == get_provenance(pipe.unet, "default")


def test_rejected_adapters_leave_pipeline_unchanged(tmp_path):
    pipe = make_pipeline()
    pipe.finetune("red circle", "blue circle", images=random_images(2), **TINY)
    good = pipe.save_lora_weights(tmp_path / "good")

    other = DiffusionCLIPPipeline(unet=make_unet(sample_size=8), scheduler=pipe.scheduler)
    other.set_progress_bar_config(disable=True)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(open(good, "rb").read()[:300])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"down_blocks.0.resnets.0.conv1.lora_A.weight": torch.zeros(4, 8, 3, 3)}, str(foreign))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")

    target = make_pipeline()
    before = {k: v.clone() for k, v in target.unet.state_dict().items()}
    modules_before = [type(m) for m in target.unet.modules()]
    for path, match in [
        (truncated, "truncated or corrupt"),
        (garbage, "truncated or corrupt"),
        (foreign, "not a DiffusionCLIP LoRA file|no LoRA config"),
        (tmp_path / "missing", "No LoRA weights"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            target.load_lora_weights(path)
    with pytest.raises(ValueError, match="another UNet"):
        other.load_lora_weights(good)
    assert other.lora_adapters == []
    after = target.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in target.unet.modules()] == modules_before and target.lora_adapters == []


def test_several_adapters_mix_and_unload(tmp_path):
    pipe = make_pipeline()
    imgs = random_images(2)
    pipe.finetune("red circle", "blue circle", images=imgs, adapter_name="blue", learning_rate=2e-2, **TINY)
    pipe.finetune("red circle", "red square", images=imgs, adapter_name="square", learning_rate=2e-2, **TINY)
    assert pipe.lora_adapters == ["blue", "square"]
    x = random_images(1, seed=7)
    pipe.set_adapters("blue")
    only_blue = pipe.edit(x, **EDIT).images
    pipe.set_adapters(["blue", "square"], [1.0, 0.0])
    torch.testing.assert_close(pipe.edit(x, **EDIT).images, only_blue)
    pipe.set_adapters(["blue", "square"], [0.5, 0.5])
    mixed = pipe.edit(x, **EDIT).images
    assert (mixed - only_blue).abs().max() > 1e-4
    with pytest.raises(ValueError, match="`adapter_names`"):
        pipe.set_adapters(["green"])
    with pytest.raises(ValueError, match="`adapter_weights`"):
        pipe.set_adapters(["blue", "square"], [1.0])
    with pytest.raises(ValueError, match="already has an adapter"):
        pipe.finetune("red circle", "blue circle", images=imgs, adapter_name="blue", **TINY)
    pipe.unload_lora_weights("square")
    assert pipe.lora_adapters == ["blue"]
    pipe.set_adapters("blue")
    torch.testing.assert_close(pipe.edit(x, **EDIT).images, only_blue)


def test_save_pretrained_with_adapter_reloads_base_and_adapter(tmp_path):
    pipe = make_pipeline()
    pipe.finetune("red circle", "blue circle", images=random_images(2), learning_rate=2e-2, **TINY)
    x = random_images(1, seed=5)
    edited = pipe.edit(x, **EDIT).images
    pipe.save_pretrained(tmp_path / "pipe")
    # the UNet on disk is the clean base model (no peft keys, nothing re-initialised)
    unet = UNet2DModel.from_pretrained(tmp_path / "pipe" / "unet")
    assert all(torch.equal(v, base_state_dict(pipe.unet)[k]) for k, v in unet.state_dict().items())
    loaded = DiffusionCLIPPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.lora_adapters == ["default"]
    assert torch.equal(loaded.edit(x, **EDIT).images, edited)
    assert pipe.lora_adapters == ["default"] and torch.equal(pipe.edit(x, **EDIT).images, edited)


def with_second_clip(pipe, seed):
    tokenizer = make_tokenizer()
    pipe.register_modules(clip_model_2=make_clip(tokenizer, seed=seed), clip_tokenizer_2=tokenizer)
    return pipe


def test_second_clip_averages_the_clip_loss():
    # first step (LoRA B = 0: every pipeline predicts the same x0_hat): loss = L1 term + mean of the CLIP losses
    single, only_second = make_pipeline(), make_pipeline()
    both, doubled = with_second_clip(make_pipeline(), seed=1), make_pipeline()
    only_second.register_modules(clip_model=both.clip_model_2, clip_tokenizer=both.clip_tokenizer_2)
    doubled.register_modules(clip_model_2=doubled.clip_model, clip_tokenizer_2=doubled.clip_tokenizer)
    kw = dict(images=random_images(2), learning_rate=1e-2, **TINY)
    out = {name: p.finetune("red circle", "blue circle", **kw) for name, p in
           dict(single=single, only_second=only_second, both=both, doubled=doubled).items()}  # fmt: skip
    assert [o.num_clip_models for o in out.values()] == [1, 1, 2, 2]
    first = {name: o.loss_history[0] for name, o in out.items()}
    assert first["both"] == pytest.approx((first["single"] + first["only_second"]) / 2, rel=1e-6)
    assert first["doubled"] == pytest.approx(first["single"], rel=1e-6)
    assert abs(first["single"] - first["only_second"]) > 1e-3  # the two CLIPs do disagree
    # and the training follows the average: a different adapter than with either CLIP alone
    sa, sb = adapter_state(single), adapter_state(both)
    assert any(not torch.allclose(sa[k], sb[k]) for k in sa)
    # the image-guided direction is taken in each CLIP's own embedding space
    out = both.finetune(
        "red circle", "blue circle", adapter_name="img", source_images=random_images(2, seed=1),
        target_images=random_images(2, seed=2), **kw,
    )  # fmt: skip
    assert out.num_clip_models == 2 and len(out.loss_history) == 2


def test_second_clip_needs_its_tokenizer_and_survives_save_pretrained(tmp_path):
    pipe = make_pipeline()
    with pytest.raises(ValueError, match="`clip_model_2` and `clip_tokenizer_2`"):
        DiffusionCLIPPipeline(unet=pipe.unet, scheduler=pipe.scheduler, clip_model_2=pipe.clip_model)
    with_second_clip(pipe, seed=1).save_pretrained(tmp_path / "pipe")
    loaded = DiffusionCLIPPipeline.from_pretrained(tmp_path / "pipe")
    assert len(loaded.clip_models) == 2
    for name in ("clip_model", "clip_model_2"):
        saved, restored = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(saved[k], restored[k]) for k in saved)
    assert loaded.clip_tokenizer_2("a red circle").input_ids == pipe.clip_tokenizer_2("a red circle").input_ids


def nan_at_call(n, error=None):
    """An identity loss that returns NaN (or raises ``error``) at its ``n``-th call (never for ``n=None``)."""
    calls = []

    def identity_loss(x0, x0_pred):
        calls.append(1)
        if len(calls) == n:
            if error is not None:
                raise error
            return torch.full((x0.shape[0],), float("nan"))
        return (x0 - x0_pred).abs().mean(dim=(1, 2, 3))

    return identity_loss


def pipeline_with_previous_adapter():
    """A pipeline with a trained adapter 'prev', active at weight 0.7."""
    pipe = make_pipeline()
    imgs = random_images(2)
    pipe.finetune("red circle", "blue circle", images=imgs, adapter_name="prev", learning_rate=2e-2, **TINY)
    pipe.set_adapters("prev", 0.7)
    return pipe


def assert_unchanged(pipe, x, edited, requires_grad):
    assert pipe.lora_adapters == ["prev"]
    assert torch.equal(pipe.edit(x, **EDIT).images, edited)  # same adapters, active set and scale, bit for bit
    assert [p.requires_grad for p in pipe.unet.parameters()] == requires_grad
    assert not pipe.unet.training and not pipe.unet.is_gradient_checkpointing


@pytest.mark.parametrize("error", [None, KeyboardInterrupt(), RuntimeError("boom")], ids=["nan", "interrupt", "error"])
def test_failed_run_discards_the_new_adapter_and_restores_the_previous_ones(error):
    pipe = pipeline_with_previous_adapter()
    x = random_images(1, seed=5)
    edited = pipe.edit(x, **EDIT).images
    requires_grad = [p.requires_grad for p in pipe.unet.parameters()]
    kw = dict(images=random_images(2), adapter_name="new", identity_loss_weight=1.0, **TINY)
    if error is None:
        expected, match = NonFiniteLossError, "epoch 0, batch 0, timestep 0; the new adapter is discarded"
    else:
        expected, match = type(error), None
    with pytest.raises(expected, match=match):  # at the second optimizer step: after one update of "new"
        loss = nan_at_call(2, error)
        pipe.finetune("red circle", "blue circle", identity_loss=loss, gradient_checkpointing=True, **kw)
    assert_unchanged(pipe, x, edited, requires_grad)
    # the name is free again
    out = pipe.finetune("red circle", "blue circle", identity_loss=nan_at_call(None), **kw)
    assert out.adapter_name == "new" and pipe.lora_adapters == ["prev", "new"]


@pytest.mark.parametrize("scheme", ["efficient", "full_chain"])
def test_far_too_large_learning_rate_leaves_no_adapter(scheme):
    pipe = pipeline_with_previous_adapter()
    x = random_images(1, seed=5)
    edited = pipe.edit(x, **EDIT).images
    requires_grad = [p.requires_grad for p in pipe.unet.parameters()]
    # full_chain makes one optimizer step: finite (1e30) weights whose prediction is not, caught after the step
    with pytest.raises(NonFiniteLossError, match="`learning_rate`"):
        pipe.finetune("red circle", "blue circle", images=random_images(2), learning_rate=1e30, scheme=scheme, **TINY)
    assert_unchanged(pipe, x, edited, requires_grad)


def test_failed_first_adapter_leaves_the_plain_unet():
    pipe = make_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    requires_grad = [p.requires_grad for p in pipe.unet.parameters()]
    kw = dict(images=random_images(2), identity_loss=nan_at_call(1), identity_loss_weight=1.0, **TINY)
    with pytest.raises(NonFiniteLossError, match="timestep 100"):
        pipe.finetune("red circle", "blue circle", **kw)
    after = pipe.unet.state_dict()
    assert pipe.lora_adapters == [] and after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in pipe.unet.parameters()] == requires_grad


@pytest.mark.parametrize("dtype, mixed_precision", [(torch.bfloat16, "no"), (torch.float16, "fp16")])
def test_half_precision_unet_trains_float32_lora_weights_and_keeps_its_base_weights(dtype, mixed_precision):
    # fp16 + GradScaler: unscaling needs float32 gradients, and overflowing steps are skipped, not fatal
    pipe = make_pipeline()
    pipe.unet.to(dtype)
    before = {k: v.clone() for k, v in base_state_dict(pipe.unet).items()}
    kw = dict(images=random_images(2), learning_rate=2e-2, mixed_precision=mixed_precision, **TINY)
    out = pipe.finetune("red circle", "blue circle", **kw)
    assert all(math.isfinite(v) for v in out.loss_history)
    params = adapter_parameters(pipe.unet, "default")
    assert params and all(p.dtype == torch.float32 for p in params)
    assert any(v.abs().sum() > 0 for k, v in adapter_state(pipe).items() if "lora_B" in k)
    after = base_state_dict(pipe.unet)
    assert after.keys() == before.keys()
    assert all(after[k].dtype == dtype and torch.equal(before[k], after[k]) for k in before)
    x = random_images(1, seed=5)
    edited = pipe.edit(x, **EDIT).images
    assert torch.isfinite(edited).all()
    pipe.disable_lora()
    with pytest.warns(NoAdapterWarning):
        assert (pipe.edit(x, **EDIT).images - edited).abs().max() > 0


def test_provenance_is_recorded_by_the_module_function():
    pipe = make_pipeline()
    kw = dict(images=random_images(2), config=FinetuneConfig(**TINY, seed=3))
    out = finetune(pipe, "red circle", "blue circle", adapter_name="text", **kw)
    assert out.adapter_name == "text" and pipe.lora_adapters == ["text"]
    provenance = get_provenance(pipe.unet, "text")
    assert provenance == {
        "prompt_src": "red circle", "prompt_tar": "blue circle", "direction": "text", "num_clip_models": 1,
        "t0": 100, "num_inversion_steps": 3, "num_fixed_point_iterations": 0, "num_train_steps": 2, "num_epochs": 1,
        "learning_rate": 5e-4, "scheme": "efficient", "seed": 3, "package_version": __version__,
    }  # fmt: skip
    source, target = random_images(2, seed=1), random_images(2, seed=2)
    finetune(pipe, "red circle", "blue circle", adapter_name="img", source_images=source, target_images=target, **kw)
    assert get_provenance(pipe.unet, "img")["direction"] == "images"
    with pytest.raises(ValueError, match="`source_images` and `target_images`"):
        finetune(pipe, "a", "b", adapter_name="x", target_images=random_images(1), **kw)
    assert pipe.lora_adapters == ["text", "img"]


def test_latent_cache_hit_and_miss(tmp_path):
    pipe = make_pipeline()
    imgs = random_images(2)
    kw = dict(cache_dir=tmp_path, **TINY)
    assert pipe.finetune("red circle", "blue circle", images=imgs, adapter_name="a", **kw).num_cached_latents == 0
    assert len(os.listdir(tmp_path)) == 2
    assert pipe.finetune("red circle", "blue circle", images=imgs, adapter_name="b", **kw).num_cached_latents == 2
    changed = imgs.clone()
    changed[1] = -changed[1]
    assert pipe.finetune("a", "b", images=changed, adapter_name="c", **kw).num_cached_latents == 1
    assert pipe.finetune("a", "b", images=imgs, adapter_name="d", **{**kw, "t0": 99}).num_cached_latents == 0
    fixed_point = {**kw, "num_fixed_point_iterations": 1}  # other latents: another key
    assert pipe.finetune("a", "b", images=imgs, adapter_name="e", **fixed_point).num_cached_latents == 0
    assert pipe.finetune("a", "b", images=imgs, adapter_name="f", **fixed_point).num_cached_latents == 2
    other = make_pipeline(seed=1)  # other base weights: the cache must not be used
    assert other.finetune("a", "b", images=imgs, **kw).num_cached_latents == 0


def test_sampled_training_images_and_image_direction():
    pipe = make_pipeline()
    out = pipe.finetune("red circle", "blue circle", num_sampled_images=2, num_sampling_steps=3, **TINY)
    assert len(out.loss_history) == 2
    out = pipe.finetune(
        "red circle",
        "blue circle",
        images=random_images(2),
        adapter_name="img",
        source_images=random_images(2, seed=1),
        target_images=random_images(2, seed=2),
        **TINY,
    )
    assert len(out.loss_history) == 2
    with pytest.raises(ValueError, match="`source_images` and `target_images`"):
        pipe.finetune("a", "b", images=random_images(2), source_images=random_images(1), **TINY)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lora_rank=0), "`lora_rank`"),
        (dict(lora_alpha=-1), "`lora_alpha`"),
        (dict(learning_rate=0), "`learning_rate`"),
        (dict(num_epochs=0), "`num_epochs`"),
        (dict(t0=0), "`t0`"),
        (dict(t0=1000), "`t0`"),
        (dict(num_fixed_point_iterations=-1), "`num_fixed_point_iterations`"),
        (dict(scheme="fast"), "`scheme`"),
        (dict(mixed_precision="fp8"), "`mixed_precision`"),
        (dict(l1_loss_weight=-1), "`l1_loss_weight`"),
        (dict(sparse_loss_weight=float("nan")), "`sparse_loss_weight`"),
        (dict(clip_loss_type="l2"), "`clip_loss_type`"),
        (dict(clip_num_augmentations=-2), "`clip_num_augmentations`"),
        (dict(clip_augmentation_noise=-0.1), "`clip_augmentation_noise`"),
        (dict(lora_target_modules=()), "`lora_target_modules`"),
        (dict(identity_loss_weight=1.0), "`identity_loss`"),
        (dict(images=[]), "`images`"),
        (dict(prompt_tar=""), "`prompt_tar`"),
        (dict(prompt_src="  "), "`prompt_src`"),
        (dict(max_grad_norm=0.0), "`max_grad_norm`"),
        (dict(adapter_name="a/b"), "`adapter_name`"),
        (dict(adapter_name="/abs"), "`adapter_name`"),
        (dict(adapter_name="x y"), "`adapter_name`"),
        (dict(adapter_name="a\x00"), "`adapter_name`"),
        (dict(adapter_name=""), "`adapter_name`"),
        (dict(adapter_name="a.b"), "`adapter_name`"),
    ],
)
def test_finetune_validation(pipe, kwargs, match):
    args = dict(prompt_src="red circle", prompt_tar="blue circle", images=random_images(2))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pipe.finetune(**args)
    assert pipe.lora_adapters == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_fixed_point_iterations=0.5), "`num_fixed_point_iterations`"),
        (dict(num_epochs=2.0), "`num_epochs`"),
        (dict(batch_size=True), "`batch_size`"),
        (dict(learning_rate="1e-3"), "`learning_rate`"),
        (dict(l1_loss_weight=None), "`l1_loss_weight`"),
        (dict(clip_num_augmentations=1.5), "`clip_num_augmentations`"),
        (dict(scheme=1), "`scheme`"),
        (dict(seed=1.5), "`seed`"),
        (dict(gradient_checkpointing=1), "`gradient_checkpointing`"),
        (dict(prompt_src=3), "`prompt_src`"),
        (dict(adapter_name=5), "`adapter_name`"),
        (dict(identity_loss=3), "`identity_loss`"),
        (dict(images=5), "`images`"),
    ],
)
def test_finetune_wrong_types_are_type_errors(pipe, kwargs, match):
    args = dict(prompt_src="red circle", prompt_tar="blue circle", images=random_images(2))
    args.update(kwargs)
    with pytest.raises(TypeError, match=match):
        pipe.finetune(**args)
    assert pipe.lora_adapters == []
    with pytest.raises(TypeError, match="`config`"):
        finetune(pipe, "red circle", "blue circle", images=random_images(2), config={"t0": 100})


def test_unknown_setting_is_a_type_error(pipe):
    with pytest.raises(TypeError, match="num_epoch"):
        pipe.finetune("a", "b", images=random_images(1), num_epoch=3)
    assert FinetuneConfig.from_kwargs(FinetuneConfig(num_epochs=3), lora_rank=8).num_epochs == 3


def free_port() -> int:
    """A TCP port the OS says is free now (no fixed port: parallel runs on one machine must not collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_cpu_run_gives_identical_adapters(tmp_path):
    """`torchrun --nproc_per_node 2 examples/finetune.py`: accelerate's MULTI_CPU mode (gloo), one step."""
    make_pipeline().save_pretrained(tmp_path / "pipe")
    (tmp_path / "imgs").mkdir()
    for i, image in enumerate(postprocess_image(random_images(2))):
        image.save(tmp_path / "imgs" / f"{i}.png")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        os.path.join(REPO, "examples", "finetune.py"), "--model", str(tmp_path / "pipe"), "--src", "red circle",
        "--tar", "blue circle", "--images", str(tmp_path / "imgs"), "--output", str(tmp_path / "out"),
        "--t0", "100", "--num-inversion-steps", "2", "--num-train-steps", "1", "--num-epochs", "1",
        "--batch-size", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # two processes share stdout: lines may interleave, so match the records themselves
    digests = dict(re.findall(r"rank (\d/2) adapter-sha256 ([0-9a-f]{64})", result.stdout))
    assert set(digests) == {"0/2", "1/2"}
    assert digests["0/2"] == digests["1/2"]
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()

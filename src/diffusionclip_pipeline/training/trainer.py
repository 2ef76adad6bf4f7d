"""The trainer of CLIP-directional LoRA fine-tuning (DiffusionCLIP, Kim, Kwon, Ye, CVPR 2022, arXiv 2110.02711).

`finetune` checks its arguments once, prepares the run (the objective, the data, checkpoints, validation) and trains
a new adapter with `fit`, the epoch loop, undoing everything if the run fails. The three schemes are generators with
one signature that yield each loss to optimise from inside their accumulation block; `fit` makes every optimizer
step with `Trainer.backward_and_step`, the one place that steps (paper Fig. 3 / supplementary B.1;
`shared/reference/official.md` section 2):

- ``"efficient"`` (default, the paper's GPU-efficient fine-tuning): from each precomputed ``x_t0``, walk the
  ``num_train_steps`` DDIM generation steps; at every step predict eps with the LoRA UNet, form
  ``x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``, take the loss on ``x0_hat``, backpropagate and step the
  optimizer. The next ``x_t`` comes from the detached DDIM step, so memory is flat in ``num_train_steps``.
- ``"full_chain"`` (the paper's original fine-tuning): backpropagate through the whole generation chain, loss on the
  final image, one optimizer step per batch.
- ``"one_step"`` (EffDiff, Starodubcev et al., arXiv 2304.04344): the loss on the ``x0_hat`` of one UNet call at
  ``t0``.

The path from `DiffusionCLIPPipeline.finetune` to the optimizer step: ``pipe.finetune -> finetune -> fit ->
Trainer.backward_and_step``. The test-bed measurements behind the defaults are in `docs/testbed-experiments.md`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .._version import __version__
from ..choices import SCHEMES
from ..loaders import lora_state
from ..utils.checks import check_adapter_name, check_callable, check_prompt, check_timestep
from .callbacks import (
    EarlyStopping,
    ProgressLog,
    Validation,
    check_early_stopping,
    check_validation,
    end_of_epoch,
    start_of_training,
    tracking,
)
from .checkpointing import (
    Checkpoint,
    Checkpointer,
    RunSettings,
    _config_settings,
    _data_settings,
    _model_settings,
    check_checkpointing,
    read_checkpoint,
)
from .config import FinetuneConfig, FinetuneOutput, diverged
from .data import precompute_latents, training_images
from .losses import FinetuneLoss, SourceBatch, build_losses, warn_about_unknown_words, warn_if_same_prompts
from .state import UNetState, frozen_decoders

__all__ = ["MIN_LOSS_SCALE", "TRAINING_SCHEMES", "Trainer", "TrainingRun", "finetune", "fit"]

# ---- the optimizer step --------------------------------------------------------------------------------------


MIN_LOSS_SCALE = 1.0  # fp16: a run whose gradients overflow even below this loss scale has diverged


def _check_finite(loss: torch.Tensor, params, where: str) -> None:
    if not torch.isfinite(loss).all():
        raise diverged(f"Non-finite loss ({loss.item()}) at {where}")
    for p in params:
        if p.grad is not None and not torch.isfinite(p.grad).all():
            raise diverged(f"Non-finite gradient at {where}")


class Trainer:
    """The optimizer side of a run (the only place that makes an optimizer): Adam on the adapter's parameters, the
    mixed-precision forward (autocast, with a `GradScaler` for fp16), gradient accumulation and data parallelism
    through accelerate, gradient-norm clipping and the non-finite checks. Nothing is applied to the weights at a step
    whose loss or gradients are NaN/inf: a non-finite loss stops the run; so do non-finite gradients, except with fp16
    loss scaling, where the scaler skips such steps and lowers the scale (the run stops once the scale falls below
    `MIN_LOSS_SCALE`).

    Args:
        pipe ([`DiffusionCLIPPipeline`]): Its UNet holds the new adapter; its model family makes the denoiser call.
        params (`list[torch.nn.Parameter]`): The adapter's parameters (the only ones optimized).
        config (`FinetuneConfig`): ``learning_rate``, ``mixed_precision`` and ``max_grad_norm``.
        accelerator (`accelerate.Accelerator`): Wraps the UNet (DDP over processes) until `close`.
        condition (*optional*): What the UNet is conditioned on (`family.encode_prompt`), `None` if unconditional.
    """

    def __init__(self, pipe, params: list[torch.nn.Parameter], config: FinetuneConfig, accelerator, condition=None):
        self.family, self.condition = pipe.family, condition
        self.params, self.accelerator, self.device = params, accelerator, accelerator.device
        self.max_grad_norm = config.max_grad_norm
        optimizer = torch.optim.Adam(params, lr=config.learning_rate)
        # DDP over processes; undone by `close`
        self.model, self.optimizer = accelerator.prepare(pipe.denoiser, optimizer)
        # Mixed precision is applied here rather than by `Accelerator(mixed_precision=...)`: accelerate's state is a
        # process-wide singleton that refuses a second, different precision within one process.
        self.amp_dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
        fp16 = self.amp_dtype is torch.float16
        self.grad_scaler = torch.amp.GradScaler(self.device.type) if fp16 else None
        self.num_updates = 0  # accumulation boundaries passed (optimizer steps, including any the scaler skipped)

    def predict(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """The adapted UNet's prediction at integer timestep ``t`` (through its accelerate wrapper), in ``x``'s
        dtype."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return self.family.predict(self.model, x, t, self.condition).to(x.dtype)

    def accumulate(self):
        """Context of one micro-batch (accelerate syncs gradients only at accumulation boundaries)."""
        return self.accelerator.accumulate(self.model)

    def backward_and_step(self, loss: torch.Tensor, where: str) -> None:
        """Backward and, at accumulation boundaries, one optimizer step; ``where`` names the step in errors."""
        _check_finite(loss, [], where)
        scaler = self.grad_scaler
        self.accelerator.backward(scaler.scale(loss) if scaler else loss)
        if not self.accelerator.sync_gradients:
            return
        if scaler:
            scaler.unscale_(self.optimizer)
        else:  # with fp16 loss scaling, inf gradients are expected now and then: the scaler skips those steps
            _check_finite(loss, self.params, where)
        if self.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
        if scaler:
            scaler.step(self.optimizer)
            scaler.update()
            if scaler.get_scale() < MIN_LOSS_SCALE:
                raise diverged(f"Non-finite gradients at {where} even at fp16 loss scale {scaler.get_scale():g}")
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_updates += 1

    @property
    def pending_gradients(self) -> bool:
        """True while gradients are accumulated but not yet applied (between accumulation boundaries)."""
        return any(p.grad is not None for p in self.params)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """What a checkpoint needs to continue bit for bit, at an optimizer-step boundary: the optimizer's tensors
        (``"state.<param index>.<key>"``) and everything else as JSON (param groups, the `GradScaler`'s state, the
        update counter and accelerate's micro-step counter, which decides the accumulation boundaries)."""
        optimizer = self.optimizer.state_dict()
        tensors, rest = {}, {}
        for index, entry in optimizer["state"].items():
            for key, value in entry.items():
                if torch.is_tensor(value):
                    tensors[f"state.{index}.{key}"] = value
                else:
                    rest.setdefault(str(index), {})[key] = value
        return tensors, {
            "optimizer": {"param_groups": optimizer["param_groups"], "state": rest},
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "num_updates": self.num_updates,
            "accelerator_step": int(self.accelerator.step),
        }

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Restores what `state` returned (the tensors are copied into fresh memory: views into a file's buffer
        can be unaligned, and CPU kernels round differently on unaligned memory)."""
        entries: dict[int, dict] = {int(i): dict(entry) for i, entry in state["optimizer"]["state"].items()}
        for key, value in tensors.items():
            _, index, name = key.split(".", 2)
            entries.setdefault(int(index), {})[name] = value.clone()
        current = self.optimizer.state_dict()["param_groups"]
        groups = [
            {k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in group.items()}  # JSON made tuples lists
            for group, now in zip(state["optimizer"]["param_groups"], current)
        ]
        self.optimizer.load_state_dict({"state": entries, "param_groups": groups})
        if self.grad_scaler is not None:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.num_updates = int(state["num_updates"])
        self.accelerator.step = int(state["accelerator_step"])

    def check_result(self, x: torch.Tensor, t: int) -> None:
        """After the last optimizer step: raises `NonFiniteLossError` if an adapter weight is NaN/inf, or if the
        adapted UNet's noise prediction on ``x`` at ``t`` is (finite but huge weights, e.g. from a far too large
        learning rate, are caught by the latter)."""
        bad = sum(int((~torch.isfinite(p)).sum()) for p in self.params)
        if bad:
            raise diverged(f"{bad} adapter weight(s) are not finite after the last optimizer step")
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                eps = self.predict(x, t)
        finally:
            self.model.train(training)
        if not torch.isfinite(eps).all():
            largest = max(float(p.detach().abs().max()) for p in self.params)
            raise diverged(
                "The adapted UNet predicts non-finite noise after the last optimizer step (its weights reach "
                f"{largest:.3g})"
            )

    def close(self) -> None:
        """Drops the gradients and unwraps the UNet again (no DDP or autocast wrapper left on it)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)


# ---- the schemes: one generator per batch, one shared signature ------------------------------------------------

# a scheme yields ``(loss, timestep)`` from inside its accumulation block, once per optimizer update (timestep `None`
# when the loss is not of one timestep); the caller backpropagates and steps before the scheme goes on
Scheme = Callable[..., Iterator[tuple[torch.Tensor, int | None]]]


def scheme_efficient(trainer: Trainer, loss_fn: FinetuneLoss, scheduler, x, source: SourceBatch):
    """The paper's GPU-efficient fine-tuning: one update per generation step, loss on that step's ``x0_hat``; the
    chain itself is detached."""
    for t in [int(t) for t in scheduler.timesteps]:
        with trainer.accumulate():
            out = scheduler.step(trainer.predict(x, t), t, x)
            yield loss_fn(source, out.pred_original_sample), t
        x = out.prev_sample.detach()  # from the pre-update weights, as the official code


def scheme_full_chain(trainer: Trainer, loss_fn: FinetuneLoss, scheduler, x, source: SourceBatch):
    """The paper's original fine-tuning: backpropagate through the whole generation chain, loss on the final
    image."""
    with trainer.accumulate():
        for t in [int(t) for t in scheduler.timesteps]:
            x = scheduler.step(trainer.predict(x, t), t, x).prev_sample
        yield loss_fn(source, x), None


def scheme_one_step(trainer: Trainer, loss_fn: FinetuneLoss, scheduler, x, source: SourceBatch):
    """EffDiff's fine-tuning (Starodubcev et al., arXiv 2304.04344): the loss on the ``x0_hat`` of one UNet call at
    ``t0`` from ``x_t0``: one forward and backward per image."""
    t = int(scheduler.timesteps[0])  # the grid's top: t0
    with trainer.accumulate():
        yield loss_fn(source, scheduler.step(trainer.predict(x, t), t, x).pred_original_sample), t


TRAINING_SCHEMES: dict[str, Scheme] = dict(zip(SCHEMES, (scheme_efficient, scheme_full_chain, scheme_one_step)))


# ---- the run -------------------------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    """What a run trains on and with, made before its adapter exists (`finetune`, steps 1 to 3)."""

    pipe: object
    config: FinetuneConfig
    accelerator: object
    loss_fn: FinetuneLoss
    x0: torch.Tensor  # the training images, [-1, 1], in pixels
    x_t0: torch.Tensor  # their latents at t0 (the UNet's space)
    generator: torch.Generator  # the shuffling (after any sampled images' noise)
    num_cached_latents: int = 0
    checkpoints: Checkpointer | None = None
    resume: Checkpoint | None = None
    validation: Validation | None = None
    proxy: Validation | None = None  # the training images' scores (early stopping without held-out images)
    early_stopping: EarlyStopping | None = None
    early_stopping_on: str | None = None  # "validation" or "training": whose scores early stopping reads
    callback: Callable | None = None  # the user's `callback_on_epoch_end`
    stop_reason: str | None = None  # set by `fit`: why the run ended
    stopped_early: bool = False
    epochs_trained: int = 0  # set by `fit`


def fit(trainer: Trainer, run: TrainingRun) -> list[float]:
    """``config.num_epochs`` passes over the images, shuffled by ``run.generator``, each batch trained by the run's
    scheme with an optimizer step at every loss it yields; returns the loss history. With ``run.checkpoints``, writes
    one whenever due (at batch ends); with ``run.resume``, continues where that checkpoint was; with
    ``run.validation``, validates at the end of the epochs it is due and finally keeps the best epoch's weights (if
    asked). The loss goes to the accelerator's trackers, if it has any."""
    config, loss_fn, generator, checkpoints = run.config, run.loss_fn, run.generator, run.checkpoints
    scheduler = run.pipe.family.generation_scheduler(run.pipe.family.timesteps(config.t0, config.num_train_steps))
    scheme = TRAINING_SCHEMES[config.scheme]
    # data-parallel shards: every process gets the same number of batches (indices wrap around)
    n, world, rank = run.x0.shape[0], run.accelerator.num_processes, run.accelerator.process_index
    per_process = math.ceil(n / world)
    num_batches = math.ceil(per_process / config.batch_size)
    loss_history: list[float] = []
    first_epoch, first_batch = 0, 0
    if run.resume is not None:
        loss_history, first_epoch, first_batch = list(run.resume.loss_history), run.resume.epoch, run.resume.batch
        run.resume.restore(trainer, generator, loss_fn)
    done = first_epoch * num_batches + first_batch
    progress = ProgressLog(run.pipe, run.accelerator, config.num_epochs * num_batches, done)
    run.stop_reason = f"trained the `num_epochs`={config.num_epochs} epochs"
    try:
        start_of_training(run, trainer)
        for epoch in range(first_epoch, config.num_epochs):
            epoch_first_loss = len(loss_history)
            epoch_start = generator.get_state()  # what a checkpoint within this epoch stores to redraw its order
            order = torch.randperm(n, generator=generator).tolist()
            order = (order * world)[: per_process * world][rank::world]
            for b in range(first_batch if epoch == first_epoch else 0, num_batches):
                idx = order[b * config.batch_size : (b + 1) * config.batch_size]
                source, where, losses = loss_fn.source_batch(run.x0[idx]), f"epoch {epoch}, batch {b}", []
                with contextlib.closing(scheme(trainer, loss_fn, scheduler, run.x_t0[idx], source)) as updates:
                    for loss, t in updates:  # the optimizer step, inside the scheme's accumulation block
                        trainer.backward_and_step(loss, where if t is None else f"{where}, timestep {t}")
                        losses.append(loss.item())
                loss_history.extend(losses)
                progress.batch_end(epoch, trainer.num_updates, losses)
                if checkpoints is not None and checkpoints.due(trainer):
                    if b + 1 < num_batches:  # next: batch b + 1 of this epoch, in this epoch's order
                        checkpoints.write(trainer, loss_fn, epoch, b + 1, epoch_start, loss_history)
                    else:
                        checkpoints.write(trainer, loss_fn, epoch + 1, 0, generator.get_state(), loss_history)
            run.epochs_trained = epoch + 1
            reason = end_of_epoch(run, trainer, epoch + 1, progress, loss_history[epoch_first_loss:])
            if reason is not None and epoch + 1 < config.num_epochs:
                run.stop_reason, run.stopped_early = reason, True
                break
    finally:
        progress.close()
    trainer.check_result(run.x_t0[:1], int(scheduler.timesteps[0]))
    for validation in (run.validation, run.proxy):
        if validation is not None:
            validation.keep_best_weights(trainer.params)
    return loss_history


@contextlib.contextmanager
def _adapter_training(run: TrainingRun, adapter_name: str, unet_state: UNetState) -> Iterator[Trainer]:
    """The freshly added adapter, ready to train: float32 weights, even on a half-precision UNet (as
    `diffusers.training_utils.cast_training_params` does), the checkpoint's weights when resuming, the UNet in train
    mode and the decoders frozen. Afterwards the adapter is frozen and the UNet's modes are as before."""
    pipe, config = run.pipe, run.config
    unet, trainer = pipe.denoiser, None
    params = lora_state.adapter_parameters(unet, adapter_name)
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()
    try:
        if run.resume is not None:
            run.resume.load_adapter_weights(unet, adapter_name)
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        condition = pipe.family.encode_prompt(config.conditioning_prompt, config.batch_size)
        trainer = Trainer(pipe, params, config, run.accelerator, condition)
        unet.train()
        with frozen_decoders((pipe.family.autoencoder, run.loss_fn.decoder), config.decoder_gradient_checkpointing):
            yield trainer
    finally:
        if trainer is not None:
            trainer.close()
        unet_state.restore_modes(unet)
        for p in params:
            p.requires_grad_(False)
        run.accelerator.wait_for_everyone()


def _check_inputs(pipe, prompt_src, prompt_tar, config, adapter_name, identity_loss, source_images, target_images):
    check_prompt(prompt_src, "prompt_src")
    check_prompt(prompt_tar, "prompt_tar")
    if not isinstance(config, FinetuneConfig):
        raise TypeError(f"`config` must be a FinetuneConfig or None, got {type(config).__name__}.")
    if (source_images is None) != (target_images is None):
        raise ValueError("Pass both `source_images` and `target_images` for an image-guided direction, or neither.")
    check_adapter_name(adapter_name)
    if adapter_name in lora_state.adapter_names(pipe.denoiser):
        raise ValueError(f"The UNet already has an adapter named {adapter_name!r}; pick another `adapter_name`.")
    if identity_loss is not None:
        check_callable(identity_loss, "identity_loss")
    elif config.identity_loss_weight > 0:
        raise ValueError("`identity_loss_weight` > 0 needs an `identity_loss` callable.")
    check_timestep(config.t0, "t0", pipe.num_train_timesteps)  # the upper bound is the model's (the rest: config)
    if config.conditioning_prompt and pipe.text_encoder is None:
        raise ValueError(
            f"`conditioning_prompt` needs a text-conditioned UNet; this one is unconditional: "
            f"{config.conditioning_prompt!r}."
        )


def _accelerator(pipe, config: FinetuneConfig, accelerator, report_to, logging_dir, settings: RunSettings):
    """The run's accelerator (by default a single-process one, on the CPU for a CPU pipeline); the pipeline moves
    to its device and stays there."""
    from accelerate import Accelerator

    if accelerator is None:
        on_cpu = pipe.denoiser.device.type == "cpu"
        trackers = {} if report_to is None else {"log_with": report_to, "project_dir": logging_dir}
        accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps, cpu=on_cpu, **trackers
        )
    if settings.values is not None and accelerator.num_processes > 1:
        raise ValueError("`checkpoint_dir` and `resume_from` are not supported with several processes yet.")
    pipe.to(accelerator.device)
    return accelerator


def _prepared(pipe, images, name: str):
    return pipe.prepare_image(images, name=name) if images is not None else None


def _training_data(pipe, x0, config: FinetuneConfig, accelerator, loss_fn, cache_dir, settings: RunSettings):
    """The run's `TrainingRun` with its data: the training images (given or sampled) and their latents ``x_t0``
    (once, no grad, reused across epochs), their fingerprints checked against the checkpoint being resumed."""
    generator = torch.Generator().manual_seed(config.seed)  # sampled images' noise first, then the shuffling
    x0 = training_images(pipe, x0, config, accelerator.device, generator)
    x_t0, hits = precompute_latents(
        pipe, x0, config.t0, config.num_inversion_steps, config.batch_size, cache_dir,
        num_fixed_point_iterations=config.num_fixed_point_iterations, prompt=config.conditioning_prompt,
        encoding=config.encoding, generator=generator,
    )  # fmt: skip
    settings.add(lambda: _data_settings(loss_fn, x0, x_t0))
    return TrainingRun(pipe, config, accelerator, loss_fn, x0, x_t0, generator, hits, resume=settings.resume)


def _kept(run: TrainingRun) -> Validation | None:
    """The validation whose scores picked the adapter's epoch (``keep_best`` or early stopping), else the held-out
    images' (or `None`)."""
    for validation in (run.validation, run.proxy):
        if validation is not None and validation.keep_best is not None:
            return validation
    return run.validation


def _output(run: TrainingRun, adapter_name: str, loss_history: list[float], num_clip_models: int) -> FinetuneOutput:
    validation, proxy, kept = run.validation, run.proxy, _kept(run)
    scored = [v for v in (validation, proxy) if v is not None]
    return FinetuneOutput(
        adapter_name=adapter_name, loss_history=loss_history, config=run.config,
        num_cached_latents=run.num_cached_latents, num_clip_models=num_clip_models,
        validation=list(validation.history) if validation else [], best_epoch=kept.best_epoch if kept else None,
        validation_grid=validation.grid if validation else None, training_scores=list(proxy.history) if proxy else [],
        stopped_early=run.stopped_early, stop_reason=run.stop_reason,
        baseline=scored[0].baseline if scored else None,
        flat_warning=next((v.flat_warning for v in scored if v.flat_warning), None),
    )  # fmt: skip


def _provenance(prompt_src, prompt_tar, direction_images, loss_fn: FinetuneLoss, config, run: TrainingRun):
    """What the adapter's file records about its training (the latent, EffDiff and validation settings only where
    they apply)."""
    extra = {}
    if config.encoding != "ddim":
        extra["encoding"] = config.encoding
    if loss_fn.decode is not None:  # a latent model
        extra.update(conditioning_prompt=config.conditioning_prompt, l1_space=config.l1_space)
        extra["loss_decoder"] = type(loss_fn.decoder).__name__
    provenance = {
        **extra,
        **{
            "prompt_src": prompt_src,
            "prompt_tar": prompt_tar,
            "direction": "images" if direction_images is not None else "text",
            "num_clip_models": len(loss_fn.clip_losses),
            "t0": config.t0,
            "num_inversion_steps": config.num_inversion_steps,
            "num_fixed_point_iterations": config.num_fixed_point_iterations,
            "num_train_steps": config.num_train_steps,
            "num_epochs": config.num_epochs,
            "learning_rate": config.learning_rate,
            "scheme": config.scheme,
            "seed": config.seed,
            "package_version": __version__,
        },
    }
    validation = _kept(run)
    if validation is not None:
        provenance["validation"] = validation.kept_scores
        if validation.keep_best is not None:
            provenance.update(keep_best=validation.keep_best, best_epoch=validation.best_epoch)
        if validation is run.proxy:
            provenance["validation_on"] = "training images"
    if run.stopped_early:
        provenance.update(stop_reason=run.stop_reason, epochs_trained=run.epochs_trained)
    return provenance


def finetune(
    pipe,
    prompt_src: str,
    prompt_tar: str,
    images=None,
    config: FinetuneConfig | None = None,
    adapter_name: str = "default",
    identity_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    source_images=None,
    target_images=None,
    cache_dir: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume_from: str | os.PathLike | None = None,
    accelerator=None,
    loss_vae=None,
    validation_images=None,
    validation_epochs: int = 1,
    keep_best: str | None = None,
    keep_best_min_ssim: float | None = None,
    report_to: str | None = None,
    logging_dir: str | os.PathLike | None = None,
    early_stopping_patience: int | None = None,
    early_stopping_threshold: float | None = None,
    early_stopping_metric: str | None = None,
    early_stopping_on: str | None = None,
    callback_on_epoch_end: Callable | None = None,
) -> FinetuneOutput:
    r"""
    Trains a new LoRA adapter ``adapter_name`` on ``pipe.denoiser`` so that editing moves images from ``prompt_src`` to
    ``prompt_tar`` (DiffusionCLIP, arXiv 2110.02711, Sec. 3.2: directional CLIP loss plus an L1 identity term on
    latents precomputed by DDIM inversion). `DiffusionCLIPPipeline.finetune` calls this.

    The run is all or nothing: if anything raises after the adapter was added (`NonFiniteLossError`, an exception or
    a `KeyboardInterrupt` from a loss or callback), the new adapter is removed, the UNet's previous adapters are
    restored exactly (names, active set, scales, enabled flag) and the error is re-raised. On success the new adapter
    is the only active one, its weights are frozen, and its provenance (prompts, settings, package version) is
    recorded with `lora_state.set_provenance`.

    Device and dtype: the whole pipeline is moved to the accelerator's device (``pipe.to(accelerator.device)``; the
    CPU for a CPU pipeline when no ``accelerator`` is given, else accelerate's device) and stays there. The base
    weights are never changed; on a UNet in fp16 or bf16, the new adapter's weights are created in float32 (as
    `diffusers.training_utils.cast_training_params` does) so that Adam and the `GradScaler` update float32 weights.

    Args:
        pipe ([`DiffusionCLIPPipeline`]): The pipeline whose UNet gets the adapter.
        prompt_src (`str`): Text describing the source domain, e.g. ``"face"``.
        prompt_tar (`str`): Text describing the target, e.g. ``"smiling face"``.
        images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*):
            Training images (any form `pipe.invert` accepts). `None` samples ``config.num_sampled_images`` images
            from the original model (seeded DDIM).
        config ([`FinetuneConfig`], *optional*): The settings; the defaults if `None`.
        adapter_name (`str`, *optional*, defaults to `"default"`): Name of the new adapter (letters, digits, ``_``
            and ``-``); it must not exist yet.
        identity_loss (`Callable`, *optional*): ``fn(x0_source, x0_pred) -> per-sample loss`` (e.g. a face identity
            loss), weighted by ``config.identity_loss_weight``.
        source_images / target_images (*optional*): Image-guided direction (both or neither): the mean difference of
            the two sets' CLIP image embeddings replaces the text direction.
        cache_dir (`str` or `os.PathLike`, *optional*): Folder for the precomputed latents (see `precompute_latents`).
        checkpoint_dir (`str` or `os.PathLike`, *optional*): Folder for a resumable checkpoint, written every
            ``checkpoint_every`` optimizer steps to ``checkpoint_dir/checkpoint-latest/`` (only the latest is kept;
            the new one replaces it atomically, so a kill at any moment leaves the previous complete one). It holds
            the adapter (``pytorch_lora_weights.safetensors``, loadable with `load_lora_weights`), the optimizer's
            tensors (``optimizer.safetensors``), the random states (``random_states.safetensors``: the shuffling
            generator, each CLIP loss's view generator, torch's global generator) and ``trainer_state.json`` (epoch,
            batch and step counters, the loss history, the optimizer's other state, the `GradScaler`'s state, the
            settings and fingerprints, and every file's SHA-256). Safetensors and JSON only, never pickle.
        checkpoint_every (`int`, *optional*): Optimizer steps between checkpoints (needs ``checkpoint_dir``, and
            vice versa). Checkpoints are taken at batch ends with no gradients pending: with ``scheme="efficient"``
            (an optimizer step per generation step) the count is rounded up to the end of the batch, and with
            ``gradient_accumulation_steps`` > 1 to the next batch end that is also an accumulation boundary.
        resume_from (`str` or `os.PathLike`, *optional*): A checkpoint folder (or a ``checkpoint_dir``) to continue
            from: the final adapter and the loss history are then bit for bit those of an uninterrupted run (same
            device and software). The settings (every `FinetuneConfig` field), prompts, training images and their
            latents, the CLIP direction and the base UNet must be the checkpoint's, else `ValueError` naming what
            differs, before training; a truncated or corrupt checkpoint is a `ValueError` too. Not supported with
            several processes yet.
        accelerator (`accelerate.Accelerator`, *optional*): For multi-process (DDP) training; by default a
            single-process one with ``config.gradient_accumulation_steps``.
        loss_vae ([`~diffusers.AutoencoderTiny`], *optional*): Latent models only: a smaller decoder of the same
            latent space (e.g. TAESD, ``madebyollin/taesd`` for SD 1.x / 2.x) that decodes ``x0_hat`` for the loss
            instead of the pipeline's autoencoder (frozen; editing still decodes with the pipeline's own).

        validation_images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*):
            Held-out images (any form `pipe.invert` accepts) to validate on, as diffusers' training scripts do: at the
            end of every ``validation_epochs``-th epoch and after the last one, they are edited with the adapter as it
            is then (`pipe.edit` with the run's ``t0``, ``num_train_steps`` generation steps from their ``x_t0``,
            which the original model computes once, before training, with the run's inversion settings and
            ``encoding``) and scored against the images as the model sees them (`evaluation.score_edits`):
            ``s_dir`` (directional CLIP similarity with the training CLIP), ``s_dir_2`` (with `clip_model_2`, when
            the pipeline has one), ``mae`` and ``ssim`` (how much of the image the edit kept) and ``clip_score``
            (mean cosine between the edits' CLIP image embeddings and the target text's). The scores go to
            `FinetuneOutput.validation`, the progress bar and the trackers (``report_to``). Validation never changes
            training (no gradients; torch's random state forked; the shuffling and CLIP-view generators untouched):
            the adapter is bit for bit the one of a run without it. Not combinable with ``resume_from`` yet.
        validation_epochs (`int`, *optional*, defaults to 1): Validate after every k-th epoch (and after the last).
        keep_best (`str`, *optional*): Keep the adapter weights of the best validated epoch instead of the last
            one's: ``"s_dir"``, ``"s_dir_2"``, ``"clip_score"`` or ``"ssim"`` (the largest wins) or ``"mae"`` (the
            smallest wins); on a tie, the earlier epoch. The weights are copied at validation time and set back
            exactly at the end; `FinetuneOutput.best_epoch` says which epoch. Needs ``validation_images``.
        keep_best_min_ssim (`float`, *optional*): An identity floor for ``keep_best``: epochs whose ``ssim`` is
            below it are not eligible. If none is, the epoch with the highest ``ssim`` is kept, with a warning.
        report_to (`str`, *optional*): An accelerate tracker (``"tensorboard"``, ``"wandb"``, ...; its package must
            be installed, else `ImportError` before any work) for the loss of every batch (``train/loss``), the
            validation scores (``validation/<name>``) and each validation's before/after grid (``validation/grid``),
            all at the optimizer-step count; the settings are stored as its hyperparameters. Only with the accelerator
            `finetune` creates: with your own ``accelerator``, initialise its trackers yourself (they get the same
            logs).
        logging_dir (`str` or `os.PathLike`, *optional*): The trackers' folder (needed by ``"tensorboard"``: the
            events go to ``logging_dir/diffusionclip-finetune/``).
        early_stopping_patience (`int`, *optional*): Early stopping, as transformers' ``EarlyStoppingCallback``: stop
            once the validated score ``early_stopping_metric`` has not improved on its best by more than
            ``early_stopping_threshold`` for this many validations in a row (validations come every
            ``validation_epochs`` epochs), and end on the best validated epoch's weights (``keep_best``, which
            defaults to the metric). The scores are the held-out images' (``validation_images``) or, without them,
            a training-set proxy: the same edit and scores on the training images, from their own latents, after
            each due epoch (it costs ``num_train_steps`` no-grad UNet calls per training image and validation).
            `FinetuneOutput.stop_reason` says why the run ended and ``stopped_early`` whether it ended before
            ``num_epochs``; the reason is also logged.
        early_stopping_threshold (`float`, *optional*, defaults to 0.0): The least improvement that counts.
        early_stopping_metric (`str`, *optional*): ``"s_dir"``, ``"s_dir_2"``, ``"clip_score"``, ``"ssim"`` or
            ``"mae"``; defaults to ``keep_best``, else ``"s_dir"``.
        early_stopping_on (`str`, *optional*): Whose scores early stopping reads: ``"validation"`` (the held-out
            images; the default with ``validation_images``) or ``"training"`` (the proxy; the default without). With
            both ``validation_images`` and ``"training"``, both are scored (`FinetuneOutput.training_scores`): the
            proxy decides and keeps the best epoch, the held-out scores are reported.
        callback_on_epoch_end (`Callable`, *optional*): ``fn(pipe, epoch, logs)`` after each epoch (1-based), after
            its validation; ``logs`` holds ``"epoch"``, ``"num_updates"``, ``"loss"`` (the epoch's mean),
            ``"validation"`` and ``"training_scores"`` (this epoch's entries, or `None` when not validated),
            ``"validation_images"`` (the held-out edits, NCHW in [0, 1], when validated) and
            ``"validation_seconds"`` (time spent validating so far, for benchmarks). A truthy return stops the run
            after this epoch (the ``stop_when`` of the run). It must not touch the adapter or torch's random state.

    Whenever scores are computed (``validation_images`` or the proxy), the run also scores the adapter at zero
    before the first epoch (`FinetuneOutput.baseline`), and if by the first validated epoch >= 2 the best ``s_dir``
    has gained less than 0.02 over it, warns (`UserWarning` and the log; `FinetuneOutput.flat_warning`) that training
    is doing nothing, naming the likely causes (learning rate, ``t0``, prompts).

    Latent models (LDM, Stable Diffusion): training runs on the latents; the predicted ``x0`` is decoded with
    gradients (``config.decoder_gradient_checkpointing`` trades time for memory) for the CLIP loss and, with
    ``config.l1_space="pixel"`` (the default: the same weight means the same as for pixel models), for the L1 term
    against the input image; ``"latent"`` takes L1 between the latents instead. A text-conditioned UNet is
    conditioned on ``config.conditioning_prompt`` (empty by default), for the inversion and the training alike.

    Returns:
        [`FinetuneOutput`]: the adapter name, the loss of every optimizer step and, with ``validation_images``, the
        validation scores of every validated epoch, the epoch kept (``keep_best``) and the grid of the edits.

    Examples:

    ```py
    >>> from diffusionclip_pipeline.training import FinetuneConfig, finetune

    >>> out = finetune(pipe, "face", "smiling face", images=faces, config=FinetuneConfig(num_epochs=5))
    >>> edited = pipe.edit(faces[0], t0=500).images[0]

    >>> # validate on held-out faces after every epoch, keep the epoch whose edits follow the text best
    >>> out = finetune(
    ...     pipe, "face", "smiling face", images=faces, adapter_name="smile", validation_images=held_out,
    ...     keep_best="s_dir", keep_best_min_ssim=0.6, report_to="tensorboard", logging_dir="logs",
    ... )
    >>> out.best_epoch, out.validation[out.best_epoch - 1]
    ```
    """
    # 1. Check inputs, once: everything below trusts them. The checkpoint to resume from and its settings
    if config is None:  # the family's LoRA targets (a flow transformer has no ResNet convolutions)
        config = FinetuneConfig(lora_target_modules=pipe.family.default_lora_target_modules)
    _check_inputs(pipe, prompt_src, prompt_tar, config, adapter_name, identity_loss, source_images, target_images)
    check_checkpointing(checkpoint_dir, checkpoint_every, resume_from)
    keep_best_min_ssim = check_validation(
        pipe, validation_images, validation_epochs, keep_best, keep_best_min_ssim, report_to, logging_dir, accelerator,
        resume_from,
    )  # fmt: skip
    stopping = (early_stopping_patience, early_stopping_threshold, early_stopping_metric, early_stopping_on)
    threshold, metric, stopping_on = check_early_stopping(
        pipe, *stopping, validation_images is not None, keep_best, resume_from, callback_on_epoch_end
    )
    warn_if_same_prompts(prompt_src, prompt_tar, config, text_direction=source_images is None)
    settings = RunSettings(checkpoint_dir is not None, read_checkpoint(resume_from) if resume_from else None)
    settings.add(lambda: _config_settings(config, prompt_src, prompt_tar))
    x0 = _prepared(pipe, images, "images")
    direction_images = None
    if source_images is not None:  # image-guided direction
        direction_images = tuple(
            _prepared(pipe, *a) for a in ((source_images, "source_images"), (target_images, "target_images"))
        )
    x_val = _prepared(pipe, validation_images, "validation_images")

    # 2. Device: the accelerator's; the pipeline moves there and stays
    accelerator = _accelerator(pipe, config, accelerator, report_to, logging_dir, settings)
    settings.add(lambda: _model_settings(pipe))

    # 3. The objective, the data (training images and their latents), checkpoints and validation
    device = accelerator.device
    loss_fn = build_losses(pipe, config, prompt_src, prompt_tar, direction_images, identity_loss, device, loss_vae)
    warn_about_unknown_words(pipe, prompt_src, prompt_tar, config, text_direction=direction_images is None)
    run = _training_data(pipe, x0, config, accelerator, loss_fn, cache_dir, settings)
    if checkpoint_dir is not None:
        last = settings.resume.num_updates if settings.resume is not None else 0
        run.checkpoints = Checkpointer(
            os.fspath(checkpoint_dir), checkpoint_every, pipe.denoiser, adapter_name, settings.values, last
        )
    if x_val is not None:  # the held-out images' latents, by the original model, once
        best = keep_best if keep_best is not None or stopping_on != "validation" else metric
        run.validation = Validation.build(
            pipe, x_val, prompt_src, prompt_tar, config, device, validation_epochs, best, keep_best_min_ssim
        )
    if early_stopping_patience is not None:
        run.early_stopping = EarlyStopping(early_stopping_patience, threshold, metric)
        run.early_stopping_on = stopping_on
        if stopping_on == "training":  # the proxy: the training images, from their own latents
            run.proxy = Validation.build(
                pipe, run.x0, prompt_src, prompt_tar, config, device, validation_epochs, metric, None, run.x_t0
            )
            run.proxy.prefix = "training"
    run.callback = callback_on_epoch_end

    # 4. The new adapter (identical init on every process: same seed); from here on, any error removes it again and
    #    restores the previous adapters. Training draws from torch's global generator (if at all) inside the same
    #    seeded fork: reproducible from the seed, restorable from a checkpoint, and the caller's state is untouched.
    unet_state = UNetState(pipe.denoiser)
    extra = dict(validation_epochs=validation_epochs, keep_best=keep_best, keep_best_min_ssim=keep_best_min_ssim)
    try:
        with tracking(accelerator, report_to, config, prompt_src, prompt_tar, **extra):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(config.seed)
                lora_state.add_adapter(pipe.denoiser, config.lora, adapter_name)
                # 5. Train it (from the checkpoint's weights, optimizer and random states when resuming), validating
                with _adapter_training(run, adapter_name, unet_state) as trainer:
                    loss_history = fit(trainer, run)
            # 6. Record where it came from (and how it scored)
            provenance = _provenance(prompt_src, prompt_tar, direction_images, loss_fn, config, run)
            lora_state.set_provenance(pipe.denoiser, adapter_name, provenance)
    except BaseException:
        unet_state.discard(pipe.denoiser, adapter_name)
        raise
    return _output(run, adapter_name, loss_history, len(loss_fn.clip_losses))

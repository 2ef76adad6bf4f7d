"""What a fine-tuning run reports and keeps besides its adapter: validation on held-out images (as diffusers' training
scripts validate) or, as a proxy, on the training images, the best epoch's weights (``keep_best``), early stopping
(as transformers' ``EarlyStoppingCallback``), the warning that training is doing nothing, the user's
``callback_on_epoch_end``, the progress bar and accelerate's trackers (``report_to``). None of it changes training
until a run stops early: the adapter is bit for bit the one of a run without them, stopped at the same epoch."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import PIL.Image
import torch
from diffusers.utils import logging

from .. import evaluation
from ..choices import KEEP_BEST
from ..image_io import image_grid
from ..image_processing import postprocess_image
from ..utils.checks import check_callable, check_choice, check_number, check_positive_int, short_repr
from .config import FinetuneConfig, diverged
from .data import inverted_batches
from .losses import CLIPDirectionalLoss
from .state import frozen

__all__ = [
    "EARLY_STOPPING_ON", "FLAT_MIN_GAIN", "TRACKER_PACKAGES", "TRACKER_PROJECT", "EarlyStopping", "ProgressLog",
    "Validation", "check_early_stopping", "check_report_to", "tracking",
]  # fmt: skip

logger = logging.get_logger(__name__)

# accelerate's trackers (`report_to`) and the packages they need (any one of them)
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "comet_ml": ("comet_ml",)}
TRACKER_PROJECT = "diffusionclip-finetune"
# where early stopping reads its score: the held-out images' validation, or the training images' (the proxy)
EARLY_STOPPING_ON = ("validation", "training")
# "training is doing nothing": by the first validated epoch >= FLAT_AFTER_EPOCHS, the best direction score (s_dir)
# has gained less than FLAT_MIN_GAIN (a cosine) over the score of the run's start (the adapter at zero: the model's
# own regeneration)
FLAT_AFTER_EPOCHS, FLAT_MIN_GAIN = 2, 0.02


# ---- checks, before any work ---------------------------------------------------------------------------------


def check_validation(
    pipe, validation_images, validation_epochs, keep_best, keep_best_min_ssim, report_to, logging_dir, accelerator,
    resume_from,
):  # fmt: skip
    """The validation and tracking arguments of `finetune` (see there); returns ``keep_best_min_ssim`` as a float."""
    check_positive_int(validation_epochs, "validation_epochs")
    if keep_best is not None:
        check_choice(keep_best, "keep_best", KEEP_BEST)
        if validation_images is None:
            raise ValueError(
                f"`keep_best`={keep_best!r} needs `validation_images`, the held-out images whose scores pick the "
                "epoch."
            )
        if keep_best == "s_dir_2" and pipe.clip_model_2 is None:
            raise ValueError("`keep_best`='s_dir_2' needs a second CLIP (`clip_model_2`); this pipeline has one.")
    if keep_best_min_ssim is not None:
        keep_best_min_ssim = check_number(keep_best_min_ssim, "keep_best_min_ssim", minimum=-1, maximum=1)
        if keep_best is None:
            raise ValueError(
                f"`keep_best_min_ssim`={keep_best_min_ssim} is a floor for `keep_best`; pass `keep_best` too."
            )
    if resume_from is not None and validation_images is not None:
        raise ValueError(
            "`validation_images` cannot be combined with `resume_from` yet: a checkpoint holds neither the validation "
            "history nor the best epoch's weights. Resume without `validation_images` (validation never changes "
            "training, so the adapter is still bit for bit the uninterrupted run's), or start the run again."
        )
    check_report_to(report_to, logging_dir, accelerator)
    return keep_best_min_ssim


def check_early_stopping(
    pipe, patience, threshold, metric, on, has_validation_images: bool, keep_best, resume_from, callback
) -> tuple[float, str | None, str | None]:
    """The early-stopping arguments of `finetune` and its ``callback_on_epoch_end`` (see there), before any work;
    returns ``(threshold, metric, on)`` with the defaults filled in (``None`` for metric and source when off)."""
    if callback is not None:
        check_callable(callback, "callback_on_epoch_end")
    if patience is None:
        for name, value in (("threshold", threshold), ("metric", metric), ("on", on)):
            if value is not None:
                raise ValueError(
                    f"`early_stopping_{name}`={value!r} is a setting of early stopping; pass "
                    "`early_stopping_patience` too."
                )
        return 0.0, None, None
    check_positive_int(patience, "early_stopping_patience")
    threshold = 0.0 if threshold is None else check_number(threshold, "early_stopping_threshold", minimum=0)
    metric = metric if metric is not None else keep_best if keep_best is not None else "s_dir"
    check_choice(metric, "early_stopping_metric", KEEP_BEST)
    if metric == "s_dir_2" and pipe.clip_model_2 is None:
        raise ValueError(
            "`early_stopping_metric`='s_dir_2' needs a second CLIP (`clip_model_2`); this pipeline has only one."
        )
    on = on if on is not None else "validation" if has_validation_images else "training"
    check_choice(on, "early_stopping_on", EARLY_STOPPING_ON)
    if on == "validation" and not has_validation_images:
        raise ValueError(
            "`early_stopping_on`='validation' needs `validation_images`; without them, early stopping reads the "
            "training images' scores (`early_stopping_on`='training')."
        )
    if on == "training" and keep_best is not None:
        raise ValueError(
            f"`keep_best`={keep_best!r} picks the epoch by the held-out scores, while `early_stopping_on`='training' "
            "keeps the best epoch by the training images' scores; pass one of them."
        )
    if resume_from is not None:
        raise ValueError(
            "`early_stopping_patience` cannot be combined with `resume_from` yet: a checkpoint holds neither the "
            "scores seen so far nor the best epoch's weights."
        )
    return threshold, metric, on


def check_report_to(report_to: str | None, logging_dir=None, accelerator=None) -> None:
    """Checks `finetune`'s ``report_to`` and ``logging_dir`` (see there) before any work: a tracker accelerate knows,
    whose package is installed (`ImportError` otherwise), a folder when it needs one, and no ``accelerator`` of the
    caller's (whose trackers are the caller's to set up)."""
    if logging_dir is not None:
        if not isinstance(logging_dir, (str, os.PathLike)):
            raise TypeError(
                f"`logging_dir` must be a folder path (str or os.PathLike), got {short_repr(logging_dir)}."
            )
        if report_to is None:
            raise ValueError(f"`logging_dir` {os.fspath(logging_dir)!r} is only used with `report_to`; pass both.")
        if os.path.exists(logging_dir) and not os.path.isdir(logging_dir):
            raise ValueError(f"`logging_dir` {os.fspath(logging_dir)!r} exists and is not a folder.")
    if report_to is None:
        return
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    check_choice(report_to, "report_to", tuple(LOGGER_TYPE_TO_CLASS))
    if accelerator is not None:
        raise ValueError(
            f"`report_to`={report_to!r} sets up the trackers of the accelerator `finetune` creates; with your own "
            "`accelerator`, create it with `log_with=` and call its `init_trackers`: its trackers get the same logs."
        )
    packages = TRACKER_PACKAGES.get(report_to, (report_to,))
    if not any(importlib.util.find_spec(package) is not None for package in packages):
        raise ImportError(
            f"`report_to`={report_to!r} needs the {packages[0]!r} package, which is not installed: "
            f"`pip install {packages[0]}`."
        )
    if LOGGER_TYPE_TO_CLASS[report_to].requires_logging_directory and logging_dir is None:
        raise ValueError(f"`report_to`={report_to!r} writes its logs to a folder: pass `logging_dir`.")


# ---- trackers and the progress bar ---------------------------------------------------------------------------


def _tracker_config(config: FinetuneConfig, prompt_src: str, prompt_tar: str, **extra) -> dict:
    """The run's settings as the scalars (int, float, str, bool) every tracker stores as hyperparameters."""
    values = {**asdict(config), "prompt_src": prompt_src, "prompt_tar": prompt_tar, **extra}
    return {
        k: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else "none" if v is None else v
        for k, v in values.items()
    }


@contextlib.contextmanager
def tracking(accelerator, report_to: str | None, config: FinetuneConfig, prompt_src: str, prompt_tar: str, **extra):
    """With ``report_to``: the trackers of the accelerator `finetune` made, initialised with the run's settings (and
    ``extra``) as hyperparameters, and finished after the block, whatever happens (a caller's own are the caller's)."""
    if report_to is None:
        yield
        return
    try:
        accelerator.init_trackers(TRACKER_PROJECT, config=_tracker_config(config, prompt_src, prompt_tar, **extra))
        yield
    finally:
        for tracker in accelerator.trackers:
            tracker.finish()


class ProgressLog:
    """The run's progress bar (epoch, optimizer steps, the last loss and the last validation's scores, rate and time
    left) and the loss of every batch to the accelerator's trackers (``train/loss``, at the optimizer-step count)."""

    def __init__(self, pipe, accelerator, total: int, done: int = 0):
        self.bar = pipe.progress_bar(total=total, desc="fine-tuning")  # the inversion pre-pass says "inversion"
        if done:  # a resumed run: rate and time left from this run's batches only
            self.bar.n = self.bar.last_print_n = self.bar.initial = done
        self.accelerator = accelerator
        self.tracking = bool(accelerator.trackers)
        self.postfix: dict = {}
        self.scores: dict[str, str] = {}  # the last validation's, shown from then on

    def batch_end(self, epoch: int, num_updates: int, losses: list[float]) -> None:
        # a dict keeps this order (keyword arguments would be sorted): epoch, optimizer steps, last loss
        self.postfix = {"epoch": epoch, "step": num_updates, "loss": f"{losses[-1]:.4f}"}
        self.bar.set_postfix({**self.postfix, **self.scores})
        self.bar.update(1)
        if self.tracking:
            self.accelerator.log({"train/loss": sum(losses) / len(losses), "epoch": epoch + 1}, num_updates)

    def validated(self, entry: dict) -> None:
        self.scores = {k: f"{v:.3f}" for k, v in entry.items() if k != "epoch"}
        self.bar.set_postfix({**self.postfix, **self.scores})

    def close(self) -> None:
        self.bar.close()


def _log_validation(accelerator, entry: dict, grid: PIL.Image.Image, step: int, prefix: str = "validation") -> None:
    """The scores (``<prefix>/<name>``) and the before/after grid (``<prefix>/grid``) to the trackers."""
    if not accelerator.trackers:
        return
    accelerator.log({**{f"{prefix}/{k}": v for k, v in entry.items() if k != "epoch"}, "epoch": entry["epoch"]}, step)
    array = np.asarray(grid)  # HWC uint8
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":  # SummaryWriter.add_images: a batch, NCHW unless told otherwise
            tracker.log_images({f"{prefix}/grid": array[None]}, step=step, dataformats="NHWC")
        elif "log_images" in type(tracker).__dict__:  # the others that log images take a list of HWC arrays
            tracker.log_images({f"{prefix}/grid": [array]}, step=step)


# ---- validation and keep-best --------------------------------------------------------------------------------


@contextlib.contextmanager
def _progress_bars_off(pipe):
    """No progress bars from the pipeline's own calls inside the block (the run's bar is open); its settings after
    the block as they were."""
    had = hasattr(pipe, "_progress_bar_config")
    previous = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**previous, "disable": True})
    try:
        yield
    finally:
        if had:
            pipe.set_progress_bar_config(**previous)
        else:
            del pipe._progress_bar_config


@dataclass
class _Kept:
    """An epoch's score and a copy of the adapter's weights then."""

    value: float
    epoch: int
    weights: list[torch.Tensor]


@dataclass
class Validation:
    """Validation during a run: at the end of every ``every``-th epoch and after the last, the held-out images are
    edited with the current adapter (from their latents ``x_t0``, computed once with the original model), scored
    (`evaluation.score_edits`), logged to the accelerator's trackers, and, with ``keep_best``, the adapter's weights
    of the best epoch so far are copied.

    It never changes training: no gradients (the adapter frozen while it edits), the UNet in eval mode for the edit
    (its mode restored), torch's random state forked (the shuffling and CLIP-view generators are never touched),
    progress bars off.
    """

    pipe: object
    x0: torch.Tensor  # the held-out images as prepared (model input, [-1, 1])
    x_t0: torch.Tensor  # their latents at t0, by the original model
    prompt_src: str
    prompt_tar: str
    clip_losses: list[CLIPDirectionalLoss]
    edit_kwargs: dict
    batch_size: int
    every: int = 1
    keep_best: str | None = None
    min_ssim: float | None = None
    history: list[dict] = field(default_factory=list)
    rows: list[list] = field(default_factory=list)  # the grid: the inputs, then the edits of each validated epoch
    best: _Kept | None = None  # the best eligible epoch so far (by `keep_best`)
    fallback: _Kept | None = None  # while none is eligible: the epoch with the highest ssim
    best_epoch: int | None = None
    prefix: str = "validation"  # the trackers' prefix; "training" for the training images' scores (the proxy)
    seconds: float = 0.0  # spent validating (the latents, the start's scores and every validation), for benchmarks
    baseline: dict | None = None  # the scores at the run's start (`start`): the adapter at zero
    flat_warning: str | None = None  # the warning that training is doing nothing, if it was given
    last_images: torch.Tensor | None = None  # the last validation's edits, NCHW in [0, 1], on the CPU
    flat_checked: bool = False  # whether `check_learning` has looked

    @classmethod
    def build(
        cls, pipe, x_val, prompt_src, prompt_tar, config: FinetuneConfig, device, every, keep_best, min_ssim,
        x_t0=None,
    ):  # fmt: skip
        """The run's `Validation`: the held-out images' latents by the original model (every adapter bypassed),
        with the run's ``t0``, inversion steps, fixed-point iterations, encoding (noise seeded by ``config.seed``)
        and conditioning prompt; the edits regenerate them in ``config.num_train_steps`` steps, as training does.
        With ``x_t0`` (the training images' own latents, for the proxy), those latents instead."""
        start = time.perf_counter()
        x_val = x_val.to(device)
        prompt = config.conditioning_prompt or None
        if x_t0 is None:
            generator = torch.Generator().manual_seed(config.seed)  # for encoding="noise"; not the run's generator
            with _progress_bars_off(pipe):
                inverted = inverted_batches(
                    pipe, x_val, config.batch_size, config.t0, config.num_inversion_steps,
                    config.num_fixed_point_iterations, prompt, config.encoding, generator=generator,
                )  # fmt: skip
                x_t0 = torch.cat([x for _, x in inverted])
        edit_kwargs = dict(t0=config.t0, num_inference_steps=config.num_train_steps, prompt=prompt)
        clip_losses = evaluation.scoring_losses(pipe)
        validation = cls(
            pipe, x_val, x_t0, prompt_src, prompt_tar, clip_losses, edit_kwargs, config.batch_size, every, keep_best,
            min_ssim,
        )  # fmt: skip
        validation.seconds = time.perf_counter() - start
        return validation

    def due(self, epoch: int, num_epochs: int) -> bool:
        """Whether to validate after (1-based) ``epoch``: every ``every``-th one, and the last."""
        return epoch % self.every == 0 or epoch == num_epochs

    def _edit(self, epoch: int, trainer):
        """The held-out images edited and scored with the adapter as it is now (`evaluation.EditEvaluation`)."""
        pipe, unet = self.pipe, self.pipe.denoiser
        training = unet.training
        devices = [trainer.device] if trainer.device.type == "cuda" else []
        unet.eval()
        # the adapter frozen, as it is used after the run: CPU kernels can round differently on weights that
        # require grad, even without autograd, so the scores are exactly those of the adapter as it is then
        try:
            with frozen(trainer.params), torch.random.fork_rng(devices=devices), _progress_bars_off(pipe):
                return evaluation.edit_and_score(
                    pipe, self.x0, self.prompt_src, self.prompt_tar,
                    self.clip_losses, self.batch_size, self.x_t0, self.edit_kwargs,
                )  # fmt: skip
        except FloatingPointError as error:
            raise diverged(f"Validation after epoch {epoch}: {error}") from error
        finally:
            unet.train(training)

    def start(self, trainer) -> dict:
        """The scores at the run's start (the new adapter at zero: the model's own regeneration), the reference of
        the warning that training is doing nothing; kept in `baseline`, not in `history`."""
        start = time.perf_counter()
        self.baseline = {"epoch": 0, **self._edit(0, trainer).scores}
        self.seconds += time.perf_counter() - start
        return self.baseline

    def __call__(self, epoch: int, trainer) -> dict:
        """Validates the adapter as it is after (1-based) ``epoch``; returns the entry added to `history`."""
        start = time.perf_counter()
        out = self._edit(epoch, trainer)
        entry = {"epoch": epoch, **out.scores}
        self.history.append(entry)
        self.last_images = out.images
        if not self.rows:
            self.rows.append(postprocess_image(out.source * 2 - 1))
        edited = postprocess_image(out.images * 2 - 1)
        self.rows.append(edited)
        if self.keep_best is not None:
            self._consider(entry, trainer.params)
        grid = image_grid([self.rows[0], edited])
        _log_validation(trainer.accelerator, entry, grid, trainer.num_updates, self.prefix)
        self.seconds += time.perf_counter() - start
        return entry

    def check_learning(self, epoch: int, num_epochs: int) -> str | None:
        """Once, at the first validated epoch >= `FLAT_AFTER_EPOCHS` (or the last): warns (`UserWarning` and the
        log) if the best ``s_dir`` so far has gained less than `FLAT_MIN_GAIN` over the start's; returns the
        warning then."""
        if self.flat_checked or self.baseline is None or epoch < min(FLAT_AFTER_EPOCHS, num_epochs):
            return None
        self.flat_checked = True
        scores = [e["s_dir"] for e in self.history if math.isfinite(e["s_dir"])]
        gain = max(scores) - self.baseline["s_dir"] if scores else float("nan")
        if scores and gain >= FLAT_MIN_GAIN:
            return None
        self.flat_warning = (
            f"Training looks like it is doing nothing: after epoch {epoch} the direction score `s_dir` on the "
            f"{'training' if self.prefix == 'training' else 'held-out'} images has gained {gain:.4f} over the run's "
            f"start ({self.baseline['s_dir']:.4f}), less than {FLAT_MIN_GAIN}. Likely causes: a `learning_rate` too "
            "small for LoRA, a `t0` too shallow for the edit to show, or prompts the CLIP cannot tell apart (check "
            "`prompt_src` / `prompt_tar` and any unknown-words warning)."
        )
        logger.warning(self.flat_warning)
        warnings.warn(self.flat_warning, UserWarning, stacklevel=2)
        return self.flat_warning

    def _consider(self, entry: dict, params: list[torch.nn.Parameter]) -> None:
        value, ssim = entry[self.keep_best], entry["ssim"]
        eligible = math.isfinite(value) and (self.min_ssim is None or ssim >= self.min_ssim)
        if eligible:
            better = evaluation.HIGHER_IS_BETTER[self.keep_best]
            if self.best is None or (value > self.best.value if better else value < self.best.value):
                self.best = _Kept(value, entry["epoch"], [p.detach().clone() for p in params])
                self.fallback = None  # only needed while no epoch is eligible
        elif self.best is None and (self.fallback is None or ssim > self.fallback.value):
            self.fallback = _Kept(ssim, entry["epoch"], [p.detach().clone() for p in params])

    def keep_best_weights(self, params: list[torch.nn.Parameter]) -> None:
        """With ``keep_best``: sets the adapter's weights to the best epoch's, exactly (see `finetune`)."""
        if self.keep_best is None:
            return
        kept = self.best
        if kept is None:
            kept = self.fallback
            floor = f" reached `keep_best_min_ssim`={self.min_ssim}" if self.min_ssim is not None else " was eligible"
            warnings.warn(
                f"No validated epoch{floor} (with a finite `{self.keep_best}`): keeping epoch {kept.epoch}, the one "
                f"with the highest ssim ({kept.value:.4f}).",
                UserWarning,
                stacklevel=2,
            )
        with torch.no_grad():
            for p, weights in zip(params, kept.weights):
                p.copy_(weights)
        self.best_epoch = kept.epoch

    @property
    def grid(self) -> PIL.Image.Image | None:
        return image_grid(self.rows) if self.rows else None

    @property
    def kept_scores(self) -> dict | None:
        """The entry of the epoch whose weights the adapter ends with (the best or the last)."""
        if not self.history:
            return None
        epoch = self.best_epoch if self.best_epoch is not None else self.history[-1]["epoch"]
        return next(entry for entry in self.history if entry["epoch"] == epoch)


# ---- early stopping and the end of each epoch ----------------------------------------------------------------


@dataclass
class EarlyStopping:
    """Stops a run once the validated score ``metric`` has not improved on its best by more than ``threshold`` for
    ``patience`` validations in a row (transformers' ``EarlyStoppingCallback``: ``early_stopping_patience``,
    ``early_stopping_threshold``); a score that is not finite never improves."""

    patience: int
    threshold: float
    metric: str
    best: float | None = None
    best_epoch: int | None = None
    waited: int = 0

    def __call__(self, entry: dict) -> str | None:
        """Takes a validation's entry; returns why the run stops now, or `None` to go on."""
        value = entry[self.metric]
        sign = 1.0 if evaluation.HIGHER_IS_BETTER[self.metric] else -1.0
        if math.isfinite(value) and (self.best is None or sign * (value - self.best) > self.threshold):
            self.best, self.best_epoch, self.waited = value, entry["epoch"], 0
            return None
        self.waited += 1
        if self.waited < self.patience:
            return None
        best = f"{self.best:.4f} at epoch {self.best_epoch}" if self.best is not None else "none finite"
        return (
            f"early stopping after epoch {entry['epoch']}: `{self.metric}` has not improved by more than "
            f"{self.threshold:g} for {self.patience} validation(s) (best {best})"
        )


def start_of_training(run, trainer) -> None:
    """Before the first epoch: the start's scores of each validation (the reference of `check_learning`)."""
    for validation in (run.validation, run.proxy):
        if validation is not None:
            validation.start(trainer)


def end_of_epoch(run, trainer, epoch: int, progress: ProgressLog, epoch_losses: list[float]) -> str | None:
    """After (1-based) ``epoch``: validation and the proxy when due, the warning that training is doing nothing,
    early stopping and the user's ``callback_on_epoch_end``; returns why the run stops now, or `None` to go on."""
    num_epochs, validation, proxy = run.config.num_epochs, run.validation, run.proxy
    entry = proxy_entry = reason = None
    if validation is not None and validation.due(epoch, num_epochs):
        entry = validation(epoch, trainer)
        progress.validated(entry)
    if proxy is not None and proxy.due(epoch, num_epochs):
        proxy_entry = proxy(epoch, trainer)
        if validation is None:
            progress.validated(proxy_entry)
    for watched in (validation, proxy):
        if watched is not None and watched.history and watched.history[-1]["epoch"] == epoch:
            if watched.check_learning(epoch, num_epochs) is not None:
                break  # one warning is enough
    if run.early_stopping is not None:
        scores = entry if run.early_stopping_on == "validation" else proxy_entry
        reason = run.early_stopping(scores) if scores is not None else None
    if run.callback is not None:
        logs = {
            "epoch": epoch, "num_updates": trainer.num_updates,
            "loss": sum(epoch_losses) / len(epoch_losses) if epoch_losses else float("nan"),
            "validation": entry, "training_scores": proxy_entry,
            "validation_images": validation.last_images if entry is not None else None,
            "validation_seconds": sum(v.seconds for v in (validation, proxy) if v is not None),
        }  # fmt: skip
        if run.callback(run.pipe, epoch, logs) and reason is None:
            reason = f"`callback_on_epoch_end` asked to stop after epoch {epoch}"
    if reason is not None:
        logger.info(f"Fine-tuning stops: {reason}.")
    return reason

"""What a fine-tuning run reports and keeps besides its adapter: validation on held-out images (as diffusers' training
scripts validate), the best epoch's weights (``keep_best``), the progress bar and accelerate's trackers
(``report_to``). None of it changes training: the adapter is bit for bit the one of a run without them."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import PIL.Image
import torch

from .. import evaluation
from ..choices import KEEP_BEST
from ..image_io import image_grid
from ..image_processing import postprocess_image
from ..utils.checks import check_choice, check_number, check_positive_int, short_repr
from .config import FinetuneConfig, diverged
from .data import inverted_batches
from .losses import CLIPDirectionalLoss
from .state import frozen

__all__ = ["TRACKER_PACKAGES", "TRACKER_PROJECT", "ProgressLog", "Validation", "check_report_to", "tracking"]

# accelerate's trackers (`report_to`) and the packages they need (any one of them)
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "comet_ml": ("comet_ml",)}
TRACKER_PROJECT = "diffusionclip-finetune"


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


def _log_validation(accelerator, entry: dict, grid: PIL.Image.Image, step: int) -> None:
    """The scores (``validation/<name>``) and the before/after grid (``validation/grid``) to the trackers."""
    if not accelerator.trackers:
        return
    accelerator.log(
        {**{f"validation/{k}": v for k, v in entry.items() if k != "epoch"}, "epoch": entry["epoch"]}, step
    )
    array = np.asarray(grid)  # HWC uint8
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":  # SummaryWriter.add_images: a batch, NCHW unless told otherwise
            tracker.log_images({"validation/grid": array[None]}, step=step, dataformats="NHWC")
        elif "log_images" in type(tracker).__dict__:  # the others that log images take a list of HWC arrays
            tracker.log_images({"validation/grid": [array]}, step=step)


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

    @classmethod
    def build(cls, pipe, x_val, prompt_src, prompt_tar, config: FinetuneConfig, device, every, keep_best, min_ssim):
        """The run's `Validation`: the held-out images' latents by the original model (every adapter bypassed),
        with the run's ``t0``, inversion steps, fixed-point iterations, encoding (noise seeded by ``config.seed``)
        and conditioning prompt; the edits regenerate them in ``config.num_train_steps`` steps, as training does."""
        x_val = x_val.to(device)
        prompt = config.conditioning_prompt or None
        generator = torch.Generator().manual_seed(config.seed)  # for encoding="noise"; not the run's generator
        with _progress_bars_off(pipe):
            inverted = inverted_batches(
                pipe, x_val, config.batch_size, config.t0, config.num_inversion_steps,
                config.num_fixed_point_iterations, prompt, config.encoding, generator=generator,
            )  # fmt: skip
            x_t0 = torch.cat([x for _, x in inverted])
        edit_kwargs = dict(t0=config.t0, num_inference_steps=config.num_train_steps, prompt=prompt)
        clip_losses = evaluation.scoring_losses(pipe)
        return cls(
            pipe, x_val, x_t0, prompt_src, prompt_tar, clip_losses, edit_kwargs, config.batch_size, every, keep_best,
            min_ssim,
        )  # fmt: skip

    def due(self, epoch: int, num_epochs: int) -> bool:
        """Whether to validate after (1-based) ``epoch``: every ``every``-th one, and the last."""
        return epoch % self.every == 0 or epoch == num_epochs

    def __call__(self, epoch: int, trainer) -> dict:
        """Validates the adapter as it is after (1-based) ``epoch``; returns the entry added to `history`."""
        pipe, unet = self.pipe, self.pipe.denoiser
        training = unet.training
        devices = [trainer.device] if trainer.device.type == "cuda" else []
        unet.eval()
        # the adapter frozen, as it is used after the run: CPU kernels can round differently on weights that
        # require grad, even without autograd, so the scores are exactly those of the adapter as it is then
        try:
            with frozen(trainer.params), torch.random.fork_rng(devices=devices), _progress_bars_off(pipe):
                out = evaluation.edit_and_score(
                    pipe, pipe.prepare_image(self.x0, name="images"), self.prompt_src, self.prompt_tar,
                    self.clip_losses, self.batch_size, self.x_t0, self.edit_kwargs,
                )  # fmt: skip
        except FloatingPointError as error:
            raise diverged(f"Validation after epoch {epoch}: {error}") from error
        finally:
            unet.train(training)
        entry = {"epoch": epoch, **out.scores}
        self.history.append(entry)
        if not self.rows:
            self.rows.append(postprocess_image(out.source * 2 - 1))
        edited = postprocess_image(out.images * 2 - 1)
        self.rows.append(edited)
        if self.keep_best is not None:
            self._consider(entry, trainer.params)
        _log_validation(trainer.accelerator, entry, image_grid([self.rows[0], edited]), trainer.num_updates)
        return entry

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

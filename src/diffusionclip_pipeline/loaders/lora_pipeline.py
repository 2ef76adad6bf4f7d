"""`DiffusionCLIPLoraLoaderMixin`: the pipeline's adapter methods, on diffusers' `LoraBaseMixin`.

It declares ``_lora_loadable_modules = ["unet", "transformer"]`` (the denoiser, whichever the family has) and
inherits from `LoraBaseMixin` what diffusers does the same way (`fuse_lora` / `unfuse_lora`, `fused_loras`,
`set_lora_device`, `enable_lora_hotswap`, `lora_scale`). It overrides the methods where this package adds something
on top: loading and saving (our file format with fit checks, fingerprints and provenance, atomic writes, the model
card), and the adapter-state methods, which also take the denoiser's lock (`utils.locking`), check their arguments
and roll back on failure. Each delegates to `lora_state` / `lora_file` (which delegate to diffusers'
`PeftAdapterMixin` on the denoiser); the pipeline keeps no adapter state of its own, so
``pipe.denoiser.set_adapters(...)`` and ``pipe.set_adapters(...)`` are interchangeable.
"""

from __future__ import annotations

import os
import tempfile
import warnings

import torch
from diffusers.loaders.lora_base import LoraBaseMixin

from ..image_io import image_grid
from ..image_processing import postprocess_image
from ..utils.checks import check_adapter_name, check_bool, check_number
from ..utils.io import atomic_directory
from ..utils.locking import holds_unet_lock
from . import lora_file, lora_state, model_card


class DiffusionCLIPLoraLoaderMixin(LoraBaseMixin):
    """Load, save, combine, fuse and remove LoRA adapters of ``self.denoiser`` (diffusers' pipeline adapter API)."""

    _lora_loadable_modules = ["unet", "transformer"]

    @holds_unet_lock
    def fuse_lora(self, components: list[str] | None = None, lora_scale: float = 1.0, **kwargs) -> None:
        """Merges the active adapters into the denoiser's weights (diffusers' `LoraBaseMixin.fuse_lora`;
        ``components`` defaults to the denoiser, ``["unet"]`` or ``["transformer"]``). While fused, `invert` and
        `edit`, which need the original model for the inversion, raise `ValueError`: call `unfuse_lora` first (or
        edit from given ``latents`` with the full strength, which needs only the adapted model)."""
        check_number(lora_scale, "lora_scale")
        super().fuse_lora(components=components or [self.family.denoiser_name], lora_scale=lora_scale, **kwargs)

    @holds_unet_lock
    def unfuse_lora(self, components: list[str] | None = None, **kwargs) -> None:
        """Undoes `fuse_lora` (``components`` defaults to the denoiser)."""
        super().unfuse_lora(components=components or [self.family.denoiser_name], **kwargs)

    @property
    def lora_adapters(self) -> list[str]:
        """Names of the adapters loaded into the UNet."""
        return lora_state.adapter_names(self.denoiser)

    def get_list_adapters(self) -> dict[str, list[str]]:
        """The loaded adapters by component, as diffusers' pipelines return them: ``{"unet": [...]}`` (or
        ``{"transformer": [...]}`` for a flow-matching model)."""
        return {self.family.denoiser_name: lora_state.adapter_names(self.denoiser)}

    def get_active_adapters(self) -> list[str]:
        """The adapters the UNet currently applies (empty when none is loaded or all are disabled)."""
        return lora_state.active_adapters(self.denoiser) if lora_state.adapters_enabled(self.denoiser) else []

    def _adapter_to_save(self, adapter_name: str | None) -> str:
        names = lora_state.adapter_names(self.denoiser)
        if adapter_name is None:
            if not names:
                raise ValueError("There is no adapter to save: fine-tune one (`finetune`) or load one first.")
            if len(names) != 1:
                raise ValueError(f"Pass `adapter_name`: the UNet has several adapters {names}.")
            adapter_name = names[0]
        check_adapter_name(adapter_name)
        lora_state.require_adapter(self.denoiser, adapter_name)
        return adapter_name

    @holds_unet_lock
    def save_lora_weights(
        self,
        save_directory: str | os.PathLike,
        adapter_name: str | None = None,
        dtype: torch.dtype | None = None,
        example_images=None,
        example_edit_kwargs: dict | None = None,
        license: str | None = None,
    ) -> str:
        """Writes one adapter as ``save_directory/pytorch_lora_weights.safetensors`` (safetensors only, atomic), with
        its model card ``README.md``.

        The file uses diffusers' LoRA layout (``unet.``-prefixed keys, ``lora_adapter_metadata``) and records the
        base UNet's config fingerprint and the adapter's provenance (prompts, t0, steps, package version).
        ``adapter_name`` may be omitted when there is one adapter. ``dtype=torch.float16`` halves the file (2.4 MB
        instead of 4.8 MB for `google/ddpm-celebahq-256` at rank 4); by default the weights are stored as trained and
        reload bit for bit. Returns the file's path.

        The card (`model_card.adapter_card`) is a Hugging Face model card: YAML metadata (``library_name``,
        ``base_model`` when the UNet came from the hub, ``tags``, ``license`` when given) and the prompts, settings
        and validation scores the adapter recorded. ``example_images`` (any form `edit` accepts) are edited with the
        adapter alone (`edit` with ``t0`` of the fine-tuning, then ``example_edit_kwargs``) into ``grid.png``, top
        row before, bottom row after, which the card shows; without them no grid is made (nothing is computed). A
        ``README.md`` that this package did not write is left alone, with a warning. A ``save_directory`` ending in
        ``.safetensors`` is the weights file itself: no card then. Every file is written atomically (temporary file,
        then rename), the grid and the card after the weights, and everything is computed before the first write.
        """
        adapter_name = self._adapter_to_save(adapter_name)
        return self._write_adapter(save_directory, adapter_name, dtype, example_images, example_edit_kwargs, license)

    @holds_unet_lock
    def _write_adapter(
        self, save_directory, adapter_name, dtype, example_images, example_edit_kwargs, license, repo_id=None
    ) -> str:
        path = os.fspath(save_directory)
        if path.endswith(".safetensors") and not os.path.isdir(path):
            if example_images is not None:
                raise ValueError(f"`example_images` needs a folder for `save_directory`, got the file {path!r}.")
            return lora_file.save_adapter(self.denoiser, path, adapter_name, dtype=dtype)
        grid, grid_settings = None, None
        if example_images is not None:
            grid, grid_settings = self._example_grid(adapter_name, example_images, example_edit_kwargs)
        settings = lora_state.adapter_settings(self.denoiser, adapter_name)
        card = model_card.adapter_card(
            adapter_name, lora_state.get_provenance(self.denoiser, adapter_name),
            {"rank": settings.rank, "alpha": settings.alpha, "target_modules": list(settings.target_modules)},
            base_model=self._base_model_id(), repo_id=repo_id, grid_file=model_card.GRID_NAME if grid else None,
            grid_settings=grid_settings, license=license,
        )  # fmt: skip
        card_path = os.path.join(path, model_card.CARD_NAME)
        ours = _card_is_ours(card_path)
        written = {lora_file.LORA_WEIGHT_NAME, model_card.GRID_NAME} | ({model_card.CARD_NAME} if ours else set())
        # the whole folder at once: a reader never sees one adapter's weights beside another's card or grid; what
        # else the folder holds (logs, a README of someone else's) is kept, leftovers of killed writes are not
        with atomic_directory(path, keep=lambda entry: entry not in written and not _is_leftover(entry)) as tmp:
            lora_file.save_adapter(self.denoiser, tmp, adapter_name, dtype=dtype)
            if grid is not None:
                grid.save(os.path.join(tmp, model_card.GRID_NAME))
            if ours:
                with open(os.path.join(tmp, model_card.CARD_NAME), "w", encoding="utf-8", newline="") as handle:
                    handle.write(card)
        return os.path.join(os.path.abspath(path), lora_file.LORA_WEIGHT_NAME)

    def _base_model_id(self) -> str | None:
        """The base model's hub id: the UNet's ``_name_or_path``, else the pipeline's, when either names the hub."""
        for name in (self.denoiser.config.get("_name_or_path"), getattr(self, "name_or_path", None)):
            if model_card.hub_model_id(name):
                return model_card.hub_model_id(name)
        return None

    def _example_grid(self, adapter_name: str, images, edit_kwargs: dict | None):
        """``images`` edited with ``adapter_name`` alone, as a before/after grid, and the `edit` settings used."""
        if edit_kwargs is not None and not isinstance(edit_kwargs, dict):
            raise TypeError(f"`example_edit_kwargs` must be a dict of `edit` arguments, got {type(edit_kwargs)}.")
        settings = {"t0": lora_state.get_provenance(self.denoiser, adapter_name).get("t0", 500), **(edit_kwargs or {})}
        x0 = self.prepare_image(images, name="example_images")
        with lora_state.using_adapters(self.denoiser, [adapter_name]):
            edited = self.edit(x0, **{**settings, "output_type": "pil"}).images
        before = postprocess_image(x0, "pil")
        return image_grid([before, edited]), settings

    def push_adapter_to_hub(
        self,
        repo_id: str,
        adapter_name: str | None = None,
        token: str | None = None,
        private: bool = False,
        commit_message: str | None = None,
        example_images=None,
        example_edit_kwargs: dict | None = None,
        license: str | None = None,
        dtype: torch.dtype | None = None,
    ):
        """Uploads one adapter to the Hugging Face Hub as the model repository ``repo_id`` (created if missing).

        The folder `save_lora_weights` writes (weights, model card with ``repo_id`` in its usage example, and the
        before/after ``grid.png`` when ``example_images`` are given) is written to a temporary folder and uploaded
        with `huggingface_hub.HfApi.upload_folder`. ``token`` defaults to the logged-in one; ``private`` applies
        when the repository is created. Returns the `huggingface_hub.CommitInfo` of the upload.

        >>> pipe.push_adapter_to_hub("me/smile-lora", example_images=faces[:4], license="apache-2.0")
        """
        from huggingface_hub import HfApi

        if not isinstance(repo_id, str) or repo_id.count("/") != 1:
            raise ValueError(f"`repo_id` must be a hub id 'owner/name', got {repo_id!r}.")
        check_bool(private, "private")
        adapter_name = self._adapter_to_save(adapter_name)
        with tempfile.TemporaryDirectory(prefix="diffusionclip-adapter-") as folder:
            self._write_adapter(
                folder, adapter_name, dtype, example_images, example_edit_kwargs, license, repo_id=repo_id
            )  # holds the UNet's lock while writing; the upload does not need it
            api = HfApi(token=token)
            api.create_repo(repo_id, private=private, exist_ok=True)
            message = commit_message or f"Upload DiffusionCLIP adapter {adapter_name!r}"
            return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message)

    @holds_unet_lock
    def load_lora_weights(
        self, path: str | os.PathLike, adapter_name: str | None = None, keep_active: bool = False
    ) -> str:
        """Loads an adapter (a folder with ``pytorch_lora_weights.safetensors``, or the file) and activates it.

        By default it becomes the only active adapter (with a warning when that deactivates others); with
        ``keep_active=True`` it joins the active ones at weight 1 (``set_adapters`` sets other weights).

        Files written by this package (both format versions) load; so does a diffusers LoRA file for the same UNet
        that records its `LoraConfig` (``lora_adapter_metadata``). A file of another format, a truncated or corrupt
        file, non-finite weights, or an adapter for a UNet of another config raises `ValueError` and leaves the
        pipeline unchanged. Returns the adapter's name (default: ``"default"``, or ``"default_<k>"`` if taken).
        """
        names = lora_state.adapter_names(self.denoiser)
        if adapter_name is None:
            adapter_name, k = "default", 1
            while adapter_name in names:
                adapter_name, k = f"default_{k}", k + 1
        check_adapter_name(adapter_name)
        check_bool(keep_active, "keep_active")
        previous = self.get_active_adapters()
        weights = lora_state.adapter_weights(self.denoiser)
        lora_file.load_adapter(self.denoiser, os.fspath(path), adapter_name)
        if keep_active and previous:
            lora_state.set_adapters(self.denoiser, previous + [adapter_name], [weights[n] for n in previous] + [1.0])
            return adapter_name
        if previous:
            warnings.warn(
                f"Loaded adapter {adapter_name!r} is now the only active one; {previous} are loaded but inactive. "
                "Pass `keep_active=True` or call `set_adapters` to combine them.",
                stacklevel=3,
            )
        lora_state.set_adapters(self.denoiser, [adapter_name], [1.0])
        return adapter_name

    @holds_unet_lock
    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None):
        """Activates ``adapter_names`` with ``adapter_weights`` (1.0 each by default): their LoRA deltas are summed,
        each scaled by its weight (scaling the LoRA weights is the cheap approximation of edit strength)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(adapter_weights, (list, tuple)):
            weights = [check_number(w, f"adapter_weights[{i}]") for i, w in enumerate(adapter_weights)]
        else:
            weights = [check_number(adapter_weights, "adapter_weights")] * len(names)
        lora_state.set_adapters(self.denoiser, names, weights)

    @holds_unet_lock
    def disable_lora(self) -> None:
        """Bypasses every adapter (the original UNet) until `enable_lora`."""
        lora_state.set_adapters_enabled(self.denoiser, False)

    @holds_unet_lock
    def enable_lora(self) -> None:
        """Re-enables the active adapters after `disable_lora`."""
        lora_state.set_adapters_enabled(self.denoiser, True)

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        """Removes the named adapters from the UNet (diffusers' name for `unload_lora_weights(name)`)."""
        for name in [adapter_names] if isinstance(adapter_names, str) else list(adapter_names):
            self.unload_lora_weights(name)

    @holds_unet_lock
    def unload_lora_weights(self, adapter_name: str | None = None) -> None:
        """Removes one adapter (or all, when ``adapter_name`` is None) from the UNet; the other active adapters keep
        their weights."""
        if adapter_name is None:
            lora_state.remove_all_adapters(self.denoiser)
            return
        weights = lora_state.adapter_weights(self.denoiser)
        active = [n for n in lora_state.active_adapters(self.denoiser) if n != adapter_name and n in weights]
        enabled = lora_state.adapters_enabled(self.denoiser)
        lora_state.remove_adapter(self.denoiser, adapter_name)
        if active:
            lora_state.set_adapters(self.denoiser, active, [weights[n] for n in active])
            lora_state.set_adapters_enabled(self.denoiser, enabled)


def _card_is_ours(path: str) -> bool:
    """Whether the card may be written at ``path``: absent, or a README this package wrote (else a warning)."""
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            if not model_card.is_adapter_card(f.read()):
                warnings.warn(
                    f"{path!r} exists and was not written by diffusionclip-pipeline: not replaced.", stacklevel=5
                )
                return False
    return True


def _is_leftover(entry: str) -> bool:
    """A temporary file of a killed write: safetensors' ``.tmpXXXXXX`` / 0.1's ``.tmp-*``, `atomic_write`'s
    ``.<name>.<pid>.<random>.tmp``."""
    return entry.startswith(".tmp") or (entry.startswith(".") and entry.endswith(".tmp"))

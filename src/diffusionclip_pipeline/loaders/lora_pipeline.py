"""`DiffusionCLIPLoraLoaderMixin`: the pipeline's adapter methods, on diffusers' `LoraBaseMixin`.

It declares ``_lora_loadable_modules = ["unet", "transformer"]`` (the denoiser, whichever the family has) and
inherits from `LoraBaseMixin` what diffusers does the same way (`fuse_lora` / `unfuse_lora`, `fused_loras`,
`set_lora_device`, `lora_scale`); `enable_lora_hotswap` is refused (it pads adapters to a rank they do not have). It
overrides the methods where this package adds something on top: loading and saving (our file format with fit checks,
fingerprints and provenance, atomic writes, the model card, in-place hotswapping), and the adapter-state methods,
which also take the denoiser's lock (`utils.locking`), check their arguments and roll back on failure. Each delegates
to `lora_state` / `lora_file` (which delegate to diffusers' `PeftAdapterMixin` on the denoiser); the pipeline keeps
no adapter state of its own, so ``pipe.denoiser.set_adapters(...)`` and ``pipe.set_adapters(...)`` are
interchangeable for numeric weights. Per-block weight dicts go through ``pipe.set_adapters``, which expands them for
the pixel `UNet2DModel` too (diffusers' mapping leaves it out) and notes the dict on the denoiser next to the
provenance, only to report it back (`lora_state.adapter_weights`) while the layers still hold what it set.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
import types
import warnings

import torch
from diffusers.loaders.lora_base import LoraBaseMixin

from ..image_io import image_grid
from ..image_processing import PreparedImages, postprocess_image
from ..utils.checks import check_adapter_name, check_bool, check_number
from ..utils.io import atomic_directory
from ..utils.locking import holds_unet_lock
from . import lora_convert, lora_file, lora_state, model_card

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
LORA_FORMATS = ("diffusers", "kohya")


class _instance_or_class_method:
    """A method that works on the pipeline (``pipe.save_lora_weights(folder)``) and on its class, as diffusers'
    training scripts call ``Pipeline.save_lora_weights(folder, unet_lora_layers=...)``; an instance call with
    ``*_lora_layers`` takes the class path too."""

    def __init__(self, instance_method, class_method):
        self.instance_method = instance_method
        self.class_method = getattr(class_method, "__func__", class_method)  # a classmethod object's function
        functools.update_wrapper(self, instance_method)

    def __get__(self, obj, objtype=None):
        if obj is None:
            return types.MethodType(self.class_method, objtype)

        def bound(*args, **kwargs):
            if any(k.endswith("_lora_layers") for k in kwargs):
                return self.class_method(type(obj), *args, **kwargs)
            return self.instance_method(obj, *args, **kwargs)

        return functools.update_wrapper(bound, self.instance_method)


def _resolve_lora_file(source, weight_name: str | None, metadata: dict | None, tmp: str) -> str:
    """A local file holding the adapter of ``source``: a local file or folder (kohya files are converted), a hub id
    (``weight_name`` in that repository, `huggingface_hub.hf_hub_download`), or a state dict (written to ``tmp``)."""
    if isinstance(source, dict):
        tensors, file_metadata = lora_convert.from_state_dict(source, metadata)
        path = os.path.join(tmp, lora_file.LORA_WEIGHT_NAME)
        lora_file.atomic_save_file(tensors, path, file_metadata)
        return path
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"`path` must be a file, a folder, a hub id or a state dict, got {type(source).__name__}.")
    path = os.fspath(source)
    if not os.path.exists(path) and HUB_ID.fullmatch(path):
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(path, weight_name or lora_file.LORA_WEIGHT_NAME)
    elif os.path.isdir(path) and weight_name is not None:
        path = os.path.join(path, weight_name)
    return _converted_if_kohya(path, tmp)


def _converted_if_kohya(path: str, tmp: str) -> str:
    """``path``, or a diffusers-layout copy of it in ``tmp`` when its keys are kohya's."""
    file = os.path.join(path, lora_file.LORA_WEIGHT_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        return path  # `lora_file` reports it
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as handle:
            if not lora_convert.is_kohya(dict.fromkeys(handle.keys())):
                return path
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception:  # not a readable safetensors file: `lora_file` says so in its own words
        return path
    return _resolve_lora_file(tensors, None, None, tmp)


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
    def _save_lora_weights(
        self,
        save_directory: str | os.PathLike,
        adapter_name: str | None = None,
        dtype: torch.dtype | None = None,
        example_images=None,
        example_edit_kwargs: dict | None = None,
        license: str | None = None,
        format: str = "diffusers",
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

        ``format="kohya"`` writes the kohya / A1111 layout instead (``lora_unet_...lora_down.weight``, ``.alpha``;
        diffusers' `convert_state_dict_to_kohya`, with the adapter's real alpha), for the UNet adapters of Stable
        Diffusion 1.x / 2.x and SDXL, as a single file (``save_directory`` ending in ``.safetensors``, or
        ``<save_directory>/<adapter_name>.safetensors``), without a card.

        As diffusers' training scripts do, the class method form writes given LoRA layers:
        ``DiffusionCLIPPipeline.save_lora_weights(folder, unet_lora_layers=state_dict)`` (or
        ``transformer_lora_layers=``; ``unet_lora_adapter_metadata=`` / ``transformer_lora_adapter_metadata=``, the
        `LoraConfig` as a dict, records the alpha; ``weight_name`` the file name).
        """
        adapter_name = self._adapter_to_save(adapter_name)
        if format not in LORA_FORMATS:
            raise ValueError(f"`format` must be one of {LORA_FORMATS}, got {format!r}.")
        if format == "kohya":
            return self._write_kohya(save_directory, adapter_name, dtype)
        return self._write_adapter(save_directory, adapter_name, dtype, example_images, example_edit_kwargs, license)

    def _write_kohya(self, save_directory, adapter_name: str, dtype) -> str:
        path = os.fspath(save_directory)
        if not path.endswith(".safetensors"):
            path = os.path.join(path, f"{adapter_name}.safetensors")
        if lora_file.component_prefix(self.denoiser) != "unet":
            raise ValueError("`format='kohya'` is for UNet adapters (Stable Diffusion 1.x / 2.x, SDXL).")
        tensors = lora_file.adapter_tensors(self.denoiser, adapter_name, dtype)
        settings = lora_state.adapter_settings(self.denoiser, adapter_name)
        lora_file.atomic_save_file(lora_convert.to_kohya(tensors, settings), path, {"format": "pt"})
        return os.path.abspath(path)

    @classmethod
    def _save_lora_layers(
        cls,
        save_directory: str | os.PathLike,
        unet_lora_layers: dict | None = None,
        transformer_lora_layers: dict | None = None,
        unet_lora_adapter_metadata: dict | None = None,
        transformer_lora_adapter_metadata: dict | None = None,
        weight_name: str | None = None,
        safe_serialization: bool = True,
    ) -> str:
        """diffusers' class-method form (see `save_lora_weights`): the given layers, diffusers' layout."""
        if (unet_lora_layers is None) == (transformer_lora_layers is None):
            raise ValueError("Pass exactly one of `unet_lora_layers` and `transformer_lora_layers`.")
        if not safe_serialization:
            raise ValueError("Only safetensors files are written (`safe_serialization=False` is not supported).")
        prefix = "unet" if unet_lora_layers is not None else "transformer"
        layers = unet_lora_layers if unet_lora_layers is not None else transformer_lora_layers
        metadata = unet_lora_adapter_metadata if unet_lora_layers is not None else transformer_lora_adapter_metadata
        checked = lora_convert._check_tensors(layers)
        tensors, file_metadata = lora_convert.from_state_dict(
            {k if k.startswith(f"{prefix}.") else f"{prefix}.{k}": v for k, v in checked.items()}, metadata
        )
        path = os.path.join(os.fspath(save_directory), weight_name or lora_file.LORA_WEIGHT_NAME)
        lora_file.atomic_save_file(tensors, path, file_metadata)
        return os.path.abspath(path)

    save_lora_weights = _instance_or_class_method(_save_lora_weights, _save_lora_layers)

    @classmethod
    def lora_state_dict(
        cls, pretrained_model_name_or_path_or_dict, weight_name: str | None = None, return_lora_metadata: bool = False
    ):
        """The LoRA weights of a file, folder, hub id or state dict, validated as `load_lora_weights` validates them,
        with their component prefix (``unet.`` / ``transformer.``), as diffusers' `lora_state_dict` returns them:
        ``(state_dict, network_alphas)`` (always `None` here: the alpha is in the metadata), or with
        ``return_lora_metadata=True`` also the `LoraConfig` as a dict."""
        with tempfile.TemporaryDirectory(prefix="diffusionclip-lora-") as tmp:
            path = _resolve_lora_file(pretrained_model_name_or_path_or_dict, weight_name, None, tmp)
            adapter = lora_file.read_adapter_file(path)
        state_dict = {f"{adapter.prefix}.{k}": v for k, v in adapter.state_dict.items()}
        if return_lora_metadata:
            return state_dict, None, lora_file._peft_metadata(adapter.settings)
        return state_dict, None

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
            edited = self.edit(PreparedImages(x0), **{**settings, "output_type": "pil"}).images
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
        self,
        path: str | os.PathLike | dict,
        adapter_name: str | None = None,
        keep_active: bool = False,
        weight_name: str | None = None,
        lora_adapter_metadata: dict | None = None,
        hotswap: bool = False,
        low_cpu_mem_usage: bool = False,
    ) -> str:
        r"""
        Loads a LoRA adapter into the denoiser and activates it (diffusers' `load_lora_weights`).

        Files written by this package (both format versions) load; so does a diffusers LoRA file for the same UNet
        that records its `LoraConfig` (``lora_adapter_metadata``), or that does not (then ``alpha = rank``, as
        diffusers reads it), and a kohya / A1111 UNet LoRA (``lora_unet_...``, converted by diffusers' converter,
        with its ``alpha``). A file of another format, a truncated or corrupt file, non-finite weights, or an
        adapter for a UNet of another config raises `ValueError` and leaves the pipeline unchanged.

        Args:
            path (`str`, `os.PathLike` or `dict`):
                A folder with ``pytorch_lora_weights.safetensors``, or the file; a hub id (with ``weight_name`` in
                it); or a state dict with ``unet.`` / ``transformer.`` keys.
            adapter_name (`str`, *optional*, defaults to `"default"`, or `"default_<k>"` if taken):
                The name to load the adapter under; with ``hotswap=True``, the loaded adapter to replace.
            keep_active (`bool`, *optional*, defaults to `False`):
                By default the adapter becomes the only active one (with a warning when that deactivates others);
                with `True` it joins the active ones at weight 1 (`set_adapters` sets other weights).
            weight_name (`str`, *optional*):
                The file's name inside a folder or hub repository.
            lora_adapter_metadata (`dict`, *optional*):
                The `LoraConfig` of a state dict, as a dict.
            hotswap (`bool`, *optional*, defaults to `False`):
                diffusers' hotswapping: replace the weights of the loaded adapter ``adapter_name`` with the file's,
                in place. No layer is created or removed and the LoRA modules and parameters stay the same objects,
                so a `torch.compile`-d denoiser runs the new adapter without recompiling. The file must have the
                loaded adapter's rank and adapt the same modules (else `ValueError`, saying what differs, before
                anything is written); its alpha may differ (each layer keeps the weight `set_adapters` gave it; a
                different alpha changes the layers' scaling numbers, which a compiled model may recompile for). The
                active set and the weights stay as they are (``keep_active`` has no effect). Hotswapping adapters of
                different ranks needs diffusers' `enable_lora_hotswap`, which this pipeline does not offer (see
                there).
            low_cpu_mem_usage (`bool`, *optional*, defaults to `False`):
                diffusers' option, passed on to peft: the LoRA layers are created on the meta device, without the
                random initialisation that loading overwrites, and the file's tensors are assigned to them; the
                result is the same. diffusers' pipelines default to `True`; here the default is `False`, the file
                being read and checked in memory before any layer is built anyway.

        Returns:
            `str`: the adapter's name.

        Examples:

        ```py
        >>> pipe.load_lora_weights("me/smile-lora", adapter_name="edit")
        >>> pipe.unet.compile()  # in place: the pipeline keeps the same module
        >>> pipe.load_lora_weights("me/angry-lora", adapter_name="edit", hotswap=True)  # same rank: no recompile
        ```
        """
        check_bool(keep_active, "keep_active")
        check_bool(hotswap, "hotswap")
        check_bool(low_cpu_mem_usage, "low_cpu_mem_usage")
        names = lora_state.adapter_names(self.denoiser)
        if hotswap:
            if adapter_name is None:
                raise ValueError(
                    f"`hotswap=True` replaces a loaded adapter: pass its name as `adapter_name` (loaded: {names})."
                )
            with tempfile.TemporaryDirectory(prefix="diffusionclip-lora-") as tmp:
                lora_file.hotswap_adapter(
                    self.denoiser, _resolve_lora_file(path, weight_name, lora_adapter_metadata, tmp), adapter_name
                )
            return adapter_name
        if adapter_name is None:
            adapter_name, k = "default", 1
            while adapter_name in names:
                adapter_name, k = f"default_{k}", k + 1
        check_adapter_name(adapter_name)
        previous = self.get_active_adapters()
        weights = lora_state.adapter_weights(self.denoiser)
        with tempfile.TemporaryDirectory(prefix="diffusionclip-lora-") as tmp:
            lora_file.load_adapter(
                self.denoiser, _resolve_lora_file(path, weight_name, lora_adapter_metadata, tmp), adapter_name,
                low_cpu_mem_usage=low_cpu_mem_usage,
            )  # fmt: skip
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
    def set_adapters(
        self,
        adapter_names: str | list[str],
        adapter_weights: float | dict | list[float | dict | None] | None = None,
    ) -> None:
        r"""
        Activates ``adapter_names``: their LoRA deltas are summed, each scaled by its weight (diffusers'
        `set_adapters`; scaling the LoRA weights is the cheap approximation of edit strength).

        Args:
            adapter_names (`str` or `list[str]`):
                The loaded adapters to activate; the others are deactivated.
            adapter_weights (`float`, `dict`, or `list[float | dict | None]`, *optional*, defaults to 1.0 each):
                One weight for all the adapters, or one per adapter (`None` is 1.0). For a UNet (the pixel
                `UNet2DModel`, Stable Diffusion and SDXL) a weight may be a dict of per-block weights, as diffusers
                takes them: ``{"down": 0.5, "mid": 1.0, "up": {"block_0": 0.2, "block_1": [0, 1, 0.5]}}``.
                ``"down"`` / ``"up"`` hold one number for all their blocks with attention layers, or a dict by
                ``block_<i>`` of a number or of one number per attention layer of that block; ``"mid"`` holds a
                number; what is left out is 1.0. The dict is expanded by diffusers' own `_maybe_expand_lora_scales`
                and applied as diffusers applies it: to the LoRA layers inside the blocks' attention layers, and to
                the block's other layers with the same index (``resnets.<j>`` with ``attentions.<j>``); LoRA layers
                of blocks without attention layers keep 1.0. A flow-matching transformer (SD3, Flux) has no blocks
                to name: a dict raises `ValueError` there, as does an unknown key or block.

        Every argument is checked before any layer changes.

        Examples:

        ```py
        >>> pipe.set_adapters(["smile", "old"], [1.0, 0.5])
        >>> pipe.set_adapters("smile", {"down": 0.0, "up": {"block_1": [1.0, 0.5]}})  # a UNet: per-block weights
        ```
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(adapter_weights, (list, tuple)):
            weights = [
                lora_state.check_adapter_weight(self.denoiser, w, f"adapter_weights[{i}]")
                for i, w in enumerate(adapter_weights)
            ]
        else:
            weights = [lora_state.check_adapter_weight(self.denoiser, adapter_weights, "adapter_weights")] * len(names)
        lora_state.set_adapters(self.denoiser, names, weights)

    def enable_lora_hotswap(self, target_rank: int = 128, check_compiled: str = "error") -> None:
        r"""
        Not offered: diffusers' `enable_lora_hotswap` prepares hotswapping adapters of *different* ranks or alphas
        into a compiled model by padding the loaded adapter's LoRA weights with zeros to ``target_rank``, raising its
        recorded rank to it, and turning each layer's scaling into a tensor. This pipeline's adapters are files with
        their true rank and alpha (saved, fingerprinted, checked on load), which the padding would falsify: a
        padded adapter saved and reloaded would be scaled by ``alpha / target_rank`` instead of ``alpha / rank``.
        Hotswapping adapters of the same rank (`load_lora_weights` with ``hotswap=True``) needs no preparation.

        Args:
            target_rank (`int`, *optional*, defaults to 128):
                diffusers' argument; not used.
            check_compiled (`str`, *optional*, defaults to `"error"`):
                diffusers' argument; not used.

        Raises:
            `NotImplementedError`: always.
        """
        raise NotImplementedError(
            "`enable_lora_hotswap` (padding adapters to `target_rank` for hotswapping different ranks) is not "
            "supported by DiffusionCLIPPipeline: it would falsify the adapters' recorded rank. Hotswap adapters of "
            "the same rank with `load_lora_weights(..., adapter_name=..., hotswap=True)`, which needs no preparation."
        )

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

"""Hugging Face model cards for adapters: the ``README.md`` that `save_lora_weights` writes next to the weights.

A card is text built from what the adapter records about itself: its provenance (prompts, fine-tuning settings,
package version, and validation scores when a run recorded them, see `lora.get_provenance`), its LoRA shape, and the
base model's hub id when there is one. It starts with YAML front matter that the Hub (and
`huggingface_hub.ModelCard.load`) reads: ``library_name``, ``base_model``, ``tags``, ``license`` when known. This
module only builds text; the loader writes the files (`DiffusionCLIPLoraLoaderMixin.save_lora_weights`).
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Mapping

from .._version import __version__

__all__ = ["CARD_MARKER", "CARD_NAME", "GRID_NAME", "TAGS", "adapter_card", "hub_model_id", "is_adapter_card"]

CARD_NAME = "README.md"
GRID_NAME = "grid.png"
CARD_MARKER = "<!-- written by diffusionclip-pipeline: rewritten on every save_lora_weights -->"
TAGS = ("diffusionclip", "lora", "text-guided-image-editing", "image-to-image", "diffusers", "diffusionclip-pipeline")
PAPER = "https://arxiv.org/abs/2110.02711"

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_HUB_CACHE = re.compile(r"models--(?P<owner>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\]")

# provenance keys in the order the settings table lists them, with their labels
_SETTINGS = {
    "prompt_src": "source prompt",
    "prompt_tar": "target prompt",
    "direction": "edit direction from",
    "t0": "t0 (inversion depth)",
    "num_inversion_steps": "inversion steps",
    "num_fixed_point_iterations": "fixed-point iterations per inversion step",
    "num_train_steps": "generation steps per image in training",
    "num_epochs": "epochs",
    "learning_rate": "learning rate",
    "scheme": "scheme",
    "seed": "seed",
    "num_clip_models": "CLIP models in the loss",
    "package_version": "diffusionclip-pipeline version",
}


def hub_model_id(name_or_path: str | os.PathLike | None) -> str | None:
    """``owner/name`` when ``name_or_path`` names a hub model: a hub id that is not a local folder, or a folder inside
    the hub's download cache (``.../models--owner--name/snapshots/<commit>/unet``); otherwise `None`."""
    if not name_or_path:
        return None
    text = os.fspath(name_or_path)
    cached = _HUB_CACHE.search(text)
    if cached:
        return f"{cached['owner']}/{cached['name']}"
    if _HUB_ID.fullmatch(text) and not os.path.exists(text):
        return text
    return None


def is_adapter_card(text: str) -> bool:
    """Whether ``text`` is a card this module wrote (so a save may replace it; another README is left alone)."""
    return CARD_MARKER in text


_MARKDOWN_ACTIVE = re.compile(r"([\\`\[\]])")  # what could open a code span, a link or an image, or escape


def _text(value, limit: int = 300) -> str:
    """Text from an adapter file (its provenance may hold anything) as inert Markdown: one line, HTML escaped, and
    no code span, link or image can be opened; at most ``limit`` characters."""
    text = " ".join(str(value).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return _MARKDOWN_ACTIVE.sub(r"\\\1", html.escape(text, quote=False))


def _code(value) -> str:
    """Text for inside a code span: one line, no backticks (a code span cannot escape them)."""
    return " ".join(str(value).replace("`", "'").split())[:100]


def _cell(value) -> str:
    """A value as one Markdown table cell (escaped, one line, pipes escaped)."""
    if isinstance(value, (list, tuple)):
        return f"`{_code(list(value))}`".replace("|", "\\|")
    return _text(value).replace("|", "\\|")


def _table(rows: list[tuple[str, object]], header: str = "| setting | value |") -> str:
    return "\n".join([header, "| --- | --- |", *(f"| {_cell(k)} | {_cell(v)} |" for k, v in rows)])


def _flatten(scores: Mapping, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in scores.items():
        if isinstance(value, Mapping):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", f"{value:.4g}" if isinstance(value, float) else value))
    return rows


def _settings_rows(provenance: Mapping) -> list[tuple[str, object]]:
    """The fine-tuning settings of the provenance, known keys first (labelled), then any others as they are."""
    rows = [(label, provenance[key]) for key, label in _SETTINGS.items() if key in provenance]
    return rows + [(k, v) for k, v in provenance.items() if k not in _SETTINGS and k != "validation"]


def _validation_section(validation) -> str:
    if validation is None:
        return ""
    body = _table(_flatten(validation), "| score | value |") if isinstance(validation, Mapping) else _cell(validation)
    return f"## Validation\n\nScores recorded when the adapter was fine-tuned:\n\n{body}\n\n"


def _usage(base_model: str | None, repo_id: str | None, t0) -> str:
    base = base_model or "<the base model: hub id or pipeline folder>"
    lines = ["from diffusionclip_pipeline import DiffusionCLIPPipeline", ""]
    if repo_id:
        lines = ["from huggingface_hub import snapshot_download", *lines]
    source = f"snapshot_download({json.dumps(repo_id)})" if repo_id else '"path/to/this/folder"'
    lines.append(f"pipe = DiffusionCLIPPipeline.from_pretrained({json.dumps(base)})")
    lines.append(f"pipe.load_lora_weights({source})")
    lines.append(f"edited = pipe.edit(image, t0={t0}, edit_strength=1.0).images[0]")
    return "## Use\n\n```python\n" + "\n".join(lines) + "\n```\n\n"


def _usage_t0(grid_settings: Mapping | None, provenance: Mapping) -> int:
    """The ``t0`` of the usage example: only an integer goes into the code (provenance may hold anything)."""
    t0 = (grid_settings or {}).get("t0", provenance.get("t0", 500))
    return t0 if type(t0) is int and 0 < t0 < 10_000 else 500


def _grid_section(grid_file: str | None, grid_settings: Mapping | None) -> str:
    if not grid_file:
        return ""
    settings = ", ".join(f"`{_code(k)}={_code(v)}`" for k, v in (grid_settings or {}).items())
    note = f" (`edit` with {settings})" if settings else ""
    return f"![Before (top) and after (bottom)]({grid_file})\n\n*Top: example images; bottom: edited{note}.*\n\n"


def adapter_card(
    adapter_name: str,
    provenance: Mapping,
    lora_settings: Mapping,
    base_model: str | None = None,
    repo_id: str | None = None,
    grid_file: str | None = None,
    grid_settings: Mapping | None = None,
    license: str | None = None,
) -> str:
    """The model card (``README.md`` text) of one adapter.

    Args:
        adapter_name (`str`): The adapter's name in the pipeline.
        provenance (`Mapping`): What `lora.get_provenance` returns (may be empty, e.g. for a foreign LoRA file).
        lora_settings (`Mapping`): ``rank``, ``alpha`` and ``target_modules``.
        base_model (`str`, *optional*): The base model's hub id (see `hub_model_id`); omitted from the metadata when
            `None`.
        repo_id (`str`, *optional*): The hub repository the card is for (its usage example then downloads it).
        grid_file (`str`, *optional*): A before/after image next to the card, shown under the title.
        grid_settings (`Mapping`, *optional*): The `edit` arguments that made ``grid_file``.
        license (`str`, *optional*): A Hub license id (``apache-2.0``, ``mit``, ...), when known.
    """
    from huggingface_hub import ModelCardData

    metadata = ModelCardData(
        library_name="diffusers", base_model=base_model, license=license, pipeline_tag="image-to-image",
        tags=list(TAGS), base_model_relation="adapter" if base_model else None,
    )  # fmt: skip
    src, tar = provenance.get("prompt_src"), provenance.get("prompt_tar")
    title = f"“{_text(src)}” → “{_text(tar)}”" if src and tar else f"adapter `{adapter_name}`"
    version = _text(provenance.get("package_version", __version__), 40)
    of_base = f" of [{base_model}](https://huggingface.co/{base_model})" if base_model else ""
    intro = (
        f"A LoRA adapter of the UNet{of_base} "
        f"for text-guided image editing with [DiffusionCLIP]({PAPER}) (Kim, Kwon, Ye, CVPR 2022), fine-tuned with "
        f"diffusionclip-pipeline {version} by the directional CLIP loss. The weights are in diffusers' LoRA layout "
        "(`pytorch_lora_weights.safetensors`); they load with `DiffusionCLIPPipeline.load_lora_weights`."
    )
    settings = _settings_rows(provenance) or [("provenance", "not recorded (not an adapter from `finetune`)")]
    lora_rows = [(k, lora_settings[k]) for k in ("rank", "alpha", "target_modules") if k in lora_settings]
    return (
        f"---\n{metadata.to_yaml()}\n---\n{CARD_MARKER}\n\n# DiffusionCLIP: {title}\n\n{intro}\n\n"
        + _grid_section(grid_file, grid_settings)
        + _usage(base_model, repo_id, _usage_t0(grid_settings, provenance))
        + f"## Fine-tuning\n\n{_table(settings)}\n\n"
        + _validation_section(provenance.get("validation"))
        + f"## LoRA\n\n{_table(lora_rows)}\n"
    )

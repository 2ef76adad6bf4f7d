"""The adapters layer: the pipeline's LoRA loader mixin (`lora_pipeline`, on diffusers' `LoraBaseMixin`), the
adapter state (`lora_state`), the adapter file format, fingerprints and fit checks (`lora_file`) and the model card
(`model_card`). It builds on the families and the inference layer and never imports training or the commands."""

from .lora_pipeline import DiffusionCLIPLoraLoaderMixin

__all__ = ["DiffusionCLIPLoraLoaderMixin"]

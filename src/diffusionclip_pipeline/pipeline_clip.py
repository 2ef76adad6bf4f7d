"""The CLIP models of the directional loss, as pipeline components: where they load from (saved with the pipeline),
loading them, and the pairs the loss averages over. Inference never needs them; fine-tuning and scoring do."""

from __future__ import annotations

DEFAULT_CLIP = "openai/clip-vit-base-patch16"


class DiffusionCLIPClipMixin:
    """`load_clip`, `require_clip`, `clip_models` and `clip_model_name_or_path` of `DiffusionCLIPPipeline`."""

    @property
    def clip_model_name_or_path(self) -> str:
        """Where `load_clip` loads CLIP from when fine-tuning needs it; saved with the pipeline (its config)."""
        return self.config.clip_model_name_or_path

    @clip_model_name_or_path.setter
    def clip_model_name_or_path(self, value: str) -> None:
        if not isinstance(value, str) or not value:
            raise ValueError(f"`clip_model_name_or_path` must be a non-empty string, got {value!r:.100}.")
        self.register_to_config(clip_model_name_or_path=value)

    def load_clip(self, clip_model_name_or_path: str | None = None, second: bool = False, **kwargs) -> None:
        """Loads CLIP and its tokenizer (``clip_model_name_or_path`` or the pipeline's default) into the pipeline.

        With ``second=True`` they become the second CLIP (`clip_model_2`, averaged with the first in fine-tuning);
        its name or path must then be given.
        """
        from transformers import CLIPModel, CLIPTokenizer

        if second and not clip_model_name_or_path:
            raise ValueError(f"`second=True` needs a `clip_model_name_or_path`, got {clip_model_name_or_path!r}.")
        name = clip_model_name_or_path or self.clip_model_name_or_path
        try:
            clip_model = CLIPModel.from_pretrained(name, **kwargs)
            clip_tokenizer = CLIPTokenizer.from_pretrained(name)
        except OSError as error:
            raise OSError(
                f"Could not load CLIP from {name!r} ({error}). Without internet access, pass a local CLIP: "
                "`DiffusionCLIPPipeline.from_pretrained(..., clip_model=CLIPModel.from_pretrained('/local/clip'), "
                "clip_tokenizer=CLIPTokenizer.from_pretrained('/local/clip'))`, or `pipe.load_clip('/local/clip')`, "
                "or `clip_model_name_or_path='/local/clip'`."
            ) from error
        slot = "_2" if second else ""
        self.register_modules(
            **{f"clip_model{slot}": clip_model.to(self._execution_device), f"clip_tokenizer{slot}": clip_tokenizer}
        )

    def require_clip(self) -> None:
        """Loads the default CLIP (`load_clip`) unless the pipeline already has one."""
        if self.clip_model is None or self.clip_tokenizer is None:
            self.load_clip()

    @property
    def clip_models(self) -> list[tuple]:
        """The ``(clip_model, clip_tokenizer)`` pairs the CLIP loss averages over: the first CLIP, then the optional
        second one (`clip_model_2`); only those present (nothing is loaded here)."""
        pairs = [(self.clip_model, self.clip_tokenizer), (self.clip_model_2, self.clip_tokenizer_2)]
        return [(model, tokenizer) for model, tokenizer in pairs if model is not None and tokenizer is not None]

"""The fine-tuning objective in one module (DiffusionCLIP, Kim, Kwon, Ye, CVPR 2022, arXiv 2110.02711).

- `CLIPDirectionalLoss`: the directional CLIP loss, eq. (5): ``L_direction(x_gen, y_tar; x_ref, y_ref) = 1 - <dI,
  dT> / (|dI| |dT|)`` with ``dI = E_I(x_gen) - E_I(x_ref)`` and ``dT = E_T(y_tar) - E_T(y_ref)``. It knows nothing
  of pipelines: it turns images and texts into a scalar.
- `FinetuneLoss`: the whole objective on one predicted image (the CLIP terms, averaged over CLIP models, plus L1,
  sparse-change and identity terms), and `build_losses`, which makes it for a pipeline.
- The warnings about prompts that cannot teach anything (the same prompt twice, words CLIP does not know).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..choices import LOSS_TYPES
from ..families import autoencoders
from ..templates import IMAGENET_TEMPLATES
from ..utils.checks import check_choice, check_int, check_non_negative_int, check_number, check_prompt
from .config import FinetuneConfig

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "SPARSE_EPS",
    "CLIPDirectionalLoss",
    "FinetuneLoss",
    "SourceBatch",
    "build_losses",
    "direction_loss",
    "sparse_change",
    "unknown_words",
]

# OpenAI CLIP's normalisation constants (also in every `openai/clip-*` preprocessor_config.json).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _features(output) -> torch.Tensor:
    """transformers 5 returns `BaseModelOutputWithPooling` (projected embedding in ``pooler_output``), 4.x a tensor."""
    return output if torch.is_tensor(output) else output.pooler_output


_WORD = re.compile(r"[^\W_]+")  # runs of letters and digits (any script)
_WORD_MARKERS = ("</w>", "\u2581", "\u0120")  # end of word (CLIP BPE), start of word (SentencePiece, GPT-2 BPE)


def _piece(token: str) -> str:
    for marker in _WORD_MARKERS:
        token = token.replace(marker, "")
    return token


def unknown_words(tokenizer, text: str) -> list[str]:
    """The words of ``text`` that ``tokenizer`` does not know, in order, each once.

    A word (a run of letters and digits; numbers are never reported) is unknown if the tokenizer gives its
    ``unk_token`` for it, or if it falls apart into single characters (or bytes) only while being longer than 2
    characters: CLIP's byte-level BPE has no unknown token, so a word it never merged is the sign.

    Example:

    ```py
    >>> unknown_words(tokenizer, "a photo of a zxqv")
    ['zxqv']
    ```
    """
    unk = getattr(tokenizer, "unk_token", None)
    found, seen = [], set()
    for word in _WORD.findall(text):
        if word.isdigit() or word.lower() in seen:
            continue
        seen.add(word.lower())
        tokens = tokenizer.tokenize(word)
        pieces = [_piece(t) for t in tokens]
        if (unk is not None and unk in tokens) or (len(word) > 2 and all(len(p) <= 1 for p in pieces)):
            found.append(word)
    return found


def direction_loss(image_direction: torch.Tensor, text_direction: torch.Tensor, loss_type: str = "cosine"):
    """Per-sample directional loss between two sets of directions (need not be normalised).

    Args:
        image_direction (`torch.Tensor`): ``(batch, dim)`` image-embedding changes.
        text_direction (`torch.Tensor`): ``(dim,)`` or ``(batch, dim)`` target direction.
        loss_type (`str`, *optional*, defaults to `"cosine"`): ``"cosine"`` gives ``1 - cos`` in [0, 2] (the
            paper's eq. 5); ``"neg_log"`` gives ``-log((1 + cos) / 2)``, the form DiffusionCLIP's code trains with.

    Returns:
        `torch.Tensor`: ``(batch,)`` losses.
    """
    check_choice(loss_type, "loss_type", LOSS_TYPES)
    cos = F.cosine_similarity(image_direction, text_direction.expand_as(image_direction), dim=-1, eps=1e-8)
    if loss_type == "cosine":
        return 1.0 - cos
    # clamp only guards log(0) at exactly opposite directions; the value there is +inf in exact arithmetic
    return -torch.log(((1.0 + cos) / 2.0).clamp_min(1e-12))


def _deprecated_normalisation(kwargs: dict) -> dict[str, Sequence[float]]:
    """`CLIPDirectionalLoss`'s normalisation: OpenAI CLIP's, or the deprecated ``image_mean`` / ``image_std``."""
    unknown = sorted(set(kwargs) - {"image_mean", "image_std"})
    if unknown:
        raise TypeError(f"CLIPDirectionalLoss got unexpected keyword argument(s) {unknown}.")
    if kwargs:
        warnings.warn(
            "`image_mean` / `image_std` of CLIPDirectionalLoss are deprecated (removed in 0.3): it normalises with "
            "OpenAI CLIP's constants; for another CLIP, set its `image_mean` / `image_std` buffers.",
            FutureWarning,
            stacklevel=3,
        )
    return {"image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD, **kwargs}


class CLIPDirectionalLoss(nn.Module):
    r"""Directional CLIP loss on a frozen transformers `CLIPModel` (DiffusionCLIP, arXiv 2110.02711, eq. 5).

    Images enter in the diffusion model's range [-1, 1] and are preprocessed differentiably: [-1, 1] -> [0, 1] ->
    bicubic (antialiased) resize to the vision tower's ``image_size`` -> CLIP mean/std normalisation.

    Args:
        clip_model (`transformers.CLIPModel`): Frozen here (``requires_grad_(False)``, ``eval()``).
        tokenizer (`transformers.CLIPTokenizer`): The model's tokenizer.
        templates (`Sequence[str]`, *optional*, defaults to the 79 ImageNet templates): Prompt templates with one
            ``{}``; the text direction is averaged over them.
        loss_type (`str`, *optional*, defaults to `"cosine"`): See `direction_loss`.
        direction_weight (`float`, *optional*, defaults to 1.0): Weight of the directional term.
        global_weight (`float`, *optional*, defaults to 0.0): Weight of an extra global term
            ``1 - cos(E_I(x_gen), E_T(target))`` (off in DiffusionCLIP's fine-tuning; its loss class has it).
        num_augmentations (`int`, *optional*, defaults to 0): Random views per sample (same view for source and
            generated image) over which the loss is averaged; 0 (the official code) encodes the images as they are.
            Views keep the fine-tuned model from satisfying CLIP with pixel-exact adversarial patterns.
        augmentation_shift (`float`, *optional*, defaults to 0.125): Largest translation, as a fraction of the size.
        seed (`int`, *optional*, defaults to 0): Seed of the views.

    The images are normalised with OpenAI CLIP's constants (those of every ``openai/clip-*`` checkpoint), kept in the
    buffers ``image_mean`` and ``image_std``; for a CLIP normalised otherwise, set those. The keywords ``image_mean``
    and ``image_std`` still work, with a `FutureWarning` (removed in 0.3).

    Example:

    ```py
    >>> loss_fn = CLIPDirectionalLoss(clip_model, tokenizer)
    >>> loss = loss_fn(x0_source, x0_generated, "face", "smiling face")  # images in [-1, 1]
    ```
    """

    def __init__(
        self,
        clip_model,
        tokenizer,
        templates: Sequence[str] = IMAGENET_TEMPLATES,
        loss_type: str = "cosine",
        direction_weight: float = 1.0,
        global_weight: float = 0.0,
        num_augmentations: int = 0,
        augmentation_shift: float = 0.125,
        augmentation_noise: float = 0.0,
        seed: int = 0,
        **deprecated,
    ):
        super().__init__()
        normalisation = _deprecated_normalisation(deprecated)
        check_choice(loss_type, "loss_type", LOSS_TYPES)
        templates = tuple(templates)
        if not templates or any(not isinstance(t, str) or t.count("{}") != 1 for t in templates):
            raise ValueError(
                f"`templates` must be a non-empty list of strings with exactly one '{{}}', got {templates}."
            )
        global_weight = check_number(global_weight, "global_weight", minimum=0)
        direction_weight = check_number(direction_weight, "direction_weight", minimum=0)
        self.clip_model = clip_model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.templates = templates
        self.loss_type = loss_type
        check_non_negative_int(num_augmentations, "num_augmentations")
        check_number(augmentation_shift, "augmentation_shift", minimum=0, maximum=0.5, max_inclusive=False)
        check_number(augmentation_noise, "augmentation_noise", minimum=0, maximum=2, max_inclusive=False)
        check_int(seed, "seed")
        self.num_augmentations = num_augmentations
        self.augmentation_shift = float(augmentation_shift)
        self.augmentation_noise = float(augmentation_noise)
        self._generator = torch.Generator().manual_seed(seed)
        self.direction_weight = float(direction_weight)
        self.global_weight = float(global_weight)
        self.image_size = int(clip_model.config.vision_config.image_size)
        for name, values in normalisation.items():
            self.register_buffer(name, torch.tensor(values).view(1, -1, 1, 1), persistent=False)
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}

    def augment(self, source: torch.Tensor, generated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``num_augmentations`` random views of each pair, the same view for source and generated image.

        A view is a random translation by up to ``augmentation_shift`` of the image size (the border pixels
        repeated) and a random horizontal flip, plus Gaussian pixel noise of std ``augmentation_noise`` (the same
        noise on both images of a pair), sampled from the loss's own seeded generator. Stacked view-major:
        ``(num_augmentations * batch, C, H, W)``.
        """
        k, b = self.num_augmentations, source.shape[0]
        shifts = (torch.rand(k * b, 2, generator=self._generator) * 2 - 1) * self.augmentation_shift * 2
        flips = torch.rand(k * b, generator=self._generator) < 0.5
        theta = torch.zeros(k * b, 2, 3)
        theta[:, 0, 0] = torch.where(flips, -1.0, 1.0)
        theta[:, 1, 1] = 1.0
        theta[:, :, 2] = shifts  # affine_grid works in [-1, 1] coordinates: a shift of s image sizes is 2 s
        theta = theta.to(device=source.device, dtype=source.dtype)
        grid = F.affine_grid(theta, (k * b, *source.shape[1:]), align_corners=False)

        noise = None
        if self.augmentation_noise > 0:
            noise = torch.randn((k * b, *source.shape[1:]), generator=self._generator) * self.augmentation_noise
            noise = noise.to(device=source.device, dtype=source.dtype)

        def view(x):
            x = F.grid_sample(x.repeat(k, 1, 1, 1), grid, padding_mode="border", align_corners=False)
            return x if noise is None else x + noise

        return view(source), view(generated)

    def get_rng_state(self) -> torch.Tensor:
        """The state of the views' generator (what a checkpoint stores to draw the same views again)."""
        return self._generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Sets the views' generator to a state from `get_rng_state`."""
        self._generator.set_state(state)

    def train(self, mode: bool = True):
        # CLIP stays in eval mode whatever the caller does (no dropout noise in the loss).
        super().train(mode)
        self.clip_model.eval()
        return self

    # ---- encoders ----------------------------------------------------------------------------------------------

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable CLIP preprocessing of ``(batch, 3, H, W)`` images in [-1, 1]."""
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images)
            raise ValueError(f"`images` must be a (batch, 3, H, W) tensor in [-1, 1], got {shape}.")
        x = (images + 1.0) / 2.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
        mean = self.image_mean.to(device=x.device, dtype=x.dtype)
        std = self.image_std.to(device=x.device, dtype=x.dtype)
        return (x - mean) / std

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP image embeddings of images in [-1, 1]; differentiable w.r.t. ``images``."""
        pixel_values = self.preprocess(images).to(self.clip_model.dtype)
        embeds = _features(self.clip_model.get_image_features(pixel_values=pixel_values))
        return F.normalize(embeds.float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised CLIP text embeddings, one row per text."""
        device = self.image_mean.device
        tokens = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        )
        output = self.clip_model.get_text_features(
            input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device)
        )
        return F.normalize(_features(output).float(), dim=-1)

    @staticmethod
    def _check_prompt(prompt, name: str) -> str:
        return check_prompt(prompt, name)

    def template_embedding(self, prompt: str) -> torch.Tensor:
        """Mean over templates of the normalised text embeddings of ``prompt`` (not normalised; cached)."""
        prompt = self._check_prompt(prompt, "prompt")
        key = ("embedding", prompt)
        if key not in self._text_cache:
            self._text_cache[key] = self.encode_texts([t.format(prompt) for t in self.templates]).mean(0)
        return self._text_cache[key]

    def text_direction(self, source_text: str, target_text: str) -> torch.Tensor:
        """Unit text direction: mean over templates of ``E_T(target) - E_T(source)``, normalised; cached per pair."""
        source_text = self._check_prompt(source_text, "source_text")
        target_text = self._check_prompt(target_text, "target_text")
        key = ("direction", source_text, target_text)
        if key not in self._text_cache:
            # mean of differences == difference of means; each template embedding is normalised first
            direction = self.template_embedding(target_text) - self.template_embedding(source_text)
            self._text_cache[key] = F.normalize(direction, dim=-1)
        return self._text_cache[key]

    def image_set_direction(self, source_images: torch.Tensor, target_images: torch.Tensor) -> torch.Tensor:
        """Unit direction between two image sets: mean ``E_I(target)`` minus mean ``E_I(source)``, normalised."""
        with torch.no_grad():
            direction = self.encode_images(target_images).mean(0) - self.encode_images(source_images).mean(0)
        return F.normalize(direction, dim=-1)

    # ---- loss --------------------------------------------------------------------------------------------------

    def forward(
        self,
        source_image: torch.Tensor,
        generated_image: torch.Tensor,
        source_text: str | None = None,
        target_text: str | None = None,
        text_direction: torch.Tensor | None = None,
        reduction: str = "mean",
        source_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Directional loss of ``generated_image`` against ``source_image`` (both ``(batch, 3, H, W)`` in [-1, 1]).

        Args:
            source_image (`torch.Tensor`): The reference images ``x_ref`` (no gradient is taken through them).
            generated_image (`torch.Tensor`): The generated images; gradients flow to them.
            source_text / target_text (`str`): The prompts defining the text direction.
            text_direction (`torch.Tensor`, *optional*): A precomputed target direction (e.g. from
                `image_set_direction`) used instead of the prompts; the global term then needs ``target_text``.
            reduction (`str`, *optional*, defaults to `"mean"`): ``"mean"`` or ``"none"`` (per-sample losses).
            source_embeds (`torch.Tensor`, *optional*): ``encode_images(source_image)``, when the caller reuses one
                source over several calls (fine-tuning's generation steps). Not allowed with augmentations (every
                call draws new views).
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"`reduction` must be 'mean' or 'none', got {reduction!r}.")
        if text_direction is None:
            if source_text is None or target_text is None:
                raise ValueError("Pass `source_text` and `target_text`, or a `text_direction`.")
            text_direction = self.text_direction(source_text, target_text)
        if source_image.shape != generated_image.shape:
            raise ValueError(
                f"`source_image` and `generated_image` must have the same shape, got {tuple(source_image.shape)} "
                f"and {tuple(generated_image.shape)}."
            )
        if self.num_augmentations > 0:
            if source_embeds is not None:
                raise ValueError("`source_embeds` cannot be reused with augmentations: every call draws new views.")
            # the same random view of source and generated image, several views per sample (see `augment`)
            source_image, generated_image = self.augment(source_image, generated_image)
        if source_embeds is None:
            with torch.no_grad():
                source_embeds = self.encode_images(source_image)
        generated_embeds = self.encode_images(generated_image)
        # F.cosine_similarity normalises dI, so |dI| scaling (and the source image's own norm) never matter
        image_direction = generated_embeds - source_embeds
        loss = self.direction_weight * direction_loss(
            image_direction, text_direction.to(generated_embeds), self.loss_type
        )
        if self.global_weight > 0:
            if target_text is None:
                raise ValueError("The global term (`global_weight` > 0) needs `target_text`.")
            target_embedding = self.template_embedding(target_text).to(generated_embeds)
            loss = loss + self.global_weight * (
                1.0 - F.cosine_similarity(generated_embeds, target_embedding.expand_as(generated_embeds), dim=-1)
            )
        if self.num_augmentations > 0:
            loss = loss.view(self.num_augmentations, -1).mean(0)  # back to one value per sample
        return loss.mean() if reduction == "mean" else loss


# ---- the objective of a run ----------------------------------------------------------------------------------


SPARSE_EPS = 0.01


def sparse_change(x0_src: torch.Tensor, x0_pred: torch.Tensor, eps: float = SPARSE_EPS) -> torch.Tensor:
    """Per-pixel ``sqrt(|x0_src - x0_pred| + eps) - sqrt(eps)`` (images in [-1, 1]); 0 where nothing changed.

    A concave penalty: the same total change costs more spread thinly over many pixels (a tint) than concentrated
    on a few (the edited object). A change of 0.06 everywhere costs 0.165 per pixel, a full 1.4 change 1.08: a
    ratio of 6.5, where L1 has 23.
    """
    return torch.sqrt((x0_src - x0_pred).abs() + eps) - eps**0.5


@dataclass
class SourceBatch:
    """A batch's source images in pixels, their CLIP embeddings (or ``None`` each) and latents (or ``None``)."""

    images: torch.Tensor
    embeds: list
    latents: torch.Tensor | None = None


@dataclass
class FinetuneLoss:
    r"""The fine-tuning objective on one predicted image (DiffusionCLIP, arXiv 2110.02711, Sec. 3.2, plus extra terms):

    ``mean_k L_clip_k(x0_src, x0_pred) + l1 |x0_src - x0_pred| + sparse * sparse_change + identity * identity_loss``

    with one directional CLIP loss per CLIP model (`CLIPDirectionalLoss`, averaged) and each term only when its
    weight is > 0. Adding a loss term means changing only this class and `build_losses`.

    Args:
        clip_losses (`list[CLIPDirectionalLoss]`): One per CLIP model.
        directions (`list[torch.Tensor]`): The target direction in each CLIP's embedding space (text or images).
        prompt_src (`str`) / prompt_tar (`str`): The prompts (the global CLIP term needs ``prompt_tar``).
        config (`FinetuneConfig`): The loss weights.
        identity_loss (`Callable`, *optional*): ``fn(x0_src, x0_pred) -> per-sample loss``.
    """

    clip_losses: list[CLIPDirectionalLoss]
    directions: list[torch.Tensor]
    prompt_src: str
    prompt_tar: str
    config: FinetuneConfig
    identity_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None
    decoder: torch.nn.Module | None = None  # the autoencoder `decode` runs (kept frozen during training)

    def random_states(self) -> dict[str, torch.Tensor]:
        """The generator state of each CLIP loss's random views, by name (``"clip_augment.<i>"``)."""
        return {f"clip_augment.{i}": fn.get_rng_state() for i, fn in enumerate(self.clip_losses)}

    def set_random_states(self, states: dict[str, torch.Tensor]) -> None:
        """Sets the views' generators to the states of `random_states`."""
        for i, fn in enumerate(self.clip_losses):
            fn.set_rng_state(states[f"clip_augment.{i}"])

    @property
    def use_clip(self) -> bool:
        return self.config.clip_loss_weight > 0 or self.config.global_clip_loss_weight > 0

    def source_batch(self, x0_src: torch.Tensor) -> SourceBatch:
        """What the loss needs of a batch's source images, once per batch and reused by every generation step (the
        official code re-encodes the source each step): the CLIP embeddings (``None`` each when the CLIP loss is off
        or draws new random views at every call) and, for an L1 in latent space, the source latents."""
        embeds = [None] * len(self.clip_losses)
        latents = None
        with torch.no_grad():
            if self.use_clip and self.config.clip_num_augmentations == 0:
                embeds = [fn.encode_images(x0_src) for fn in self.clip_losses]
            if self.encode is not None and self.config.l1_space == "latent":
                latents = self.encode(x0_src)
        return SourceBatch(x0_src, embeds, latents)

    def __call__(self, source: SourceBatch, x0_pred: torch.Tensor) -> torch.Tensor:
        """The loss of ``x0_pred`` (the UNet's space: decoded to pixels first for a latent model)."""
        config = self.config
        latents_pred = x0_pred
        if self.decode is not None:  # latent model: CLIP (and the pixel L1) see the decoded image, with gradients
            x0_pred = self.decode(x0_pred).to(source.images.dtype)
        x0_src = source.images
        loss = x0_pred.new_zeros(())
        if self.use_clip:
            clip_losses = [
                fn(x0_src, x0_pred, self.prompt_src, self.prompt_tar, text_direction=direction, source_embeds=embeds)
                for fn, direction, embeds in zip(self.clip_losses, self.directions, source.embeds)
            ]
            loss = loss + sum(clip_losses) / len(clip_losses)
        if config.l1_loss_weight > 0 and source.latents is not None:
            loss = loss + config.l1_loss_weight * (source.latents - latents_pred).abs().mean()
        elif config.l1_loss_weight > 0:
            loss = loss + config.l1_loss_weight * (x0_src - x0_pred).abs().mean()
        if config.sparse_loss_weight > 0:
            loss = loss + config.sparse_loss_weight * sparse_change(x0_src, x0_pred).mean()
        if self.identity_loss is not None and config.identity_loss_weight > 0:
            loss = loss + config.identity_loss_weight * self.identity_loss(x0_src, x0_pred).mean()
        return loss


def build_losses(
    pipe, config: FinetuneConfig, prompt_src: str, prompt_tar: str, direction_images=None, identity_loss=None,
    device: torch.device | None = None, loss_vae=None,
) -> FinetuneLoss:  # fmt: skip
    """The `FinetuneLoss` of a run: one `CLIPDirectionalLoss` per CLIP of ``pipe.clip_models`` (the default CLIP is
    loaded if the pipeline has none), with the text direction of the prompts or, given ``direction_images = (source,
    target)`` (prepared tensors), the image-set direction in each CLIP's own embedding space. For a latent model the
    predicted ``x0`` is decoded to pixels for the loss, by the pipeline's autoencoder or by ``loss_vae`` (e.g. TAESD,
    an `AutoencoderTiny` sharing the latent space)."""
    pipe.require_clip()
    clip_losses = [
        CLIPDirectionalLoss(
            clip_model, clip_tokenizer, loss_type=config.clip_loss_type,
            direction_weight=config.clip_loss_weight, global_weight=config.global_clip_loss_weight,
            num_augmentations=config.clip_num_augmentations, augmentation_noise=config.clip_augmentation_noise,
            seed=config.seed,
        ).to(device)
        for clip_model, clip_tokenizer in pipe.clip_models
    ]  # fmt: skip
    if direction_images is None:
        directions = [fn.text_direction(prompt_src, prompt_tar) for fn in clip_losses]
    else:  # image-guided: the mean embedding change between the two image sets
        source_set, target_set = (x.to(device) for x in direction_images)
        directions = [fn.image_set_direction(source_set, target_set) for fn in clip_losses]
    family, decode, encode = pipe.family, None, None
    if family.autoencoder is not None:
        if loss_vae is None:
            decode = family.decode
        else:
            decode = lambda z: autoencoders.decode(loss_vae, z.to(loss_vae.dtype))  # noqa: E731
        encode = family.encode
    decoder = loss_vae if loss_vae is not None else family.autoencoder
    return FinetuneLoss(
        clip_losses, directions, prompt_src, prompt_tar, config, identity_loss, decode, encode, decoder
    )


# ---- prompts that cannot teach anything ------------------------------------------------------------------------


def _same_prompts(prompt_src: str, prompt_tar: str) -> bool:
    return prompt_src.strip().lower() == prompt_tar.strip().lower()


def warn_if_same_prompts(prompt_src, prompt_tar, config, text_direction: bool) -> None:
    if text_direction and config.clip_loss_weight > 0 and _same_prompts(prompt_src, prompt_tar):
        warnings.warn(
            f"`prompt_src` and `prompt_tar` are the same ({prompt_src.strip()!r}): the text direction is zero, so "
            "the directional CLIP loss is constant and nothing will be learnt from it.",
            UserWarning,
            stacklevel=3,
        )


def warn_about_unknown_words(pipe, prompt_src, prompt_tar, config, text_direction: bool) -> None:
    """One warning per prompt the CLIP loss uses that has words a CLIP tokenizer does not know (`unknown_words`)."""
    used = [("prompt_src", prompt_src), ("prompt_tar", prompt_tar)] if text_direction else []
    if config.global_clip_loss_weight > 0 and not text_direction:
        used.append(("prompt_tar", prompt_tar))
    for name, prompt in used:
        words = []
        for _, tokenizer in pipe.clip_models:
            words += [w for w in unknown_words(tokenizer, prompt) if w not in words]
        if words:
            warnings.warn(
                f"`{name}` {prompt!r} has words the CLIP tokenizer does not know: {words} (they fall back to single "
                "characters, which carry little meaning for CLIP); the direction may not be what you meant.",
                UserWarning,
                stacklevel=3,
            )

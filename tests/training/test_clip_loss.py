import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_images

from diffusionclip_pipeline import IMAGENET_TEMPLATES, CLIPDirectionalLoss, direction_loss
from diffusionclip_pipeline.training.losses import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, unknown_words


@pytest.fixture
def loss_fn(clip_model, tokenizer):
    return CLIPDirectionalLoss(clip_model, tokenizer, templates=("a photo of a {}.", "a {}."))


def test_79_templates():
    assert len(IMAGENET_TEMPLATES) == 79 and len(set(IMAGENET_TEMPLATES)) == 79
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert "a photo of many {}." not in IMAGENET_TEMPLATES


def test_direction_loss_exact_values():
    e = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-3.0, 0.0, 0.0]])
    text = torch.tensor([1.0, 0.0, 0.0])
    torch.testing.assert_close(direction_loss(e, text), torch.tensor([0.0, 1.0, 2.0]))
    # -log((1 + cos) / 2): 0 for parallel, log 2 for orthogonal
    torch.testing.assert_close(direction_loss(e[:2], text, "neg_log"), torch.tensor([0.0, math.log(2.0)]))


def test_direction_loss_scale_invariant():
    gen = torch.Generator().manual_seed(0)
    e, t = torch.randn(4, 8, generator=gen), torch.randn(8, generator=gen)
    torch.testing.assert_close(direction_loss(e, t), direction_loss(17.0 * e, 0.01 * t))


def test_direction_loss_rejects_unknown_type():
    with pytest.raises(ValueError, match="`loss_type`"):
        direction_loss(torch.ones(1, 2), torch.ones(2), "l2")


def test_text_direction_is_normalised_mean_of_differences(loss_fn):
    d = loss_fn.text_direction("red circle", "blue circle")
    src = loss_fn.encode_texts(["a photo of a red circle.", "a red circle."])
    tar = loss_fn.encode_texts(["a photo of a blue circle.", "a blue circle."])
    expected = F.normalize((tar - src).mean(0), dim=-1)
    torch.testing.assert_close(d, expected)
    assert torch.linalg.norm(d).item() == pytest.approx(1.0, abs=1e-6)


def test_text_direction_cached(loss_fn, monkeypatch):
    first = loss_fn.text_direction("red circle", "blue circle")
    calls = []
    original = loss_fn.encode_texts
    monkeypatch.setattr(loss_fn, "encode_texts", lambda texts: calls.append(texts) or original(texts))
    assert loss_fn.text_direction("red circle", "blue circle") is first
    assert calls == []
    loss_fn.text_direction("red circle", "green circle")  # new pair: only the new prompt is encoded
    assert len(calls) == 1


@pytest.mark.parametrize("bad, error", [("", ValueError), ("   ", ValueError), (3, TypeError), (None, TypeError)])
def test_bad_prompts_rejected(loss_fn, bad, error):
    with pytest.raises(error, match="`target_text`"):
        loss_fn.text_direction("red circle", bad)


def test_bad_templates_rejected(clip_model, tokenizer):
    with pytest.raises(ValueError, match="`templates`"):
        CLIPDirectionalLoss(clip_model, tokenizer, templates=("no placeholder",))
    with pytest.raises(ValueError, match="`loss_type`"):
        CLIPDirectionalLoss(clip_model, tokenizer, loss_type="mse")


def test_preprocess_known_values(loss_fn):
    x = torch.full((1, 3, 16, 16), -1.0)
    out = loss_fn.preprocess(x)
    assert out.shape == (1, 3, loss_fn.image_size, loss_fn.image_size)
    expected = (0.0 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    torch.testing.assert_close(out[0, :, 0, 0], expected)
    # a different size is resized to CLIP's image_size
    assert loss_fn.preprocess(torch.zeros(2, 3, 40, 40)).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="`images`"):
        loss_fn.preprocess(torch.zeros(2, 1, 16, 16))


def test_forward_matches_definition_and_gradients(loss_fn):
    src, gen = random_images(3, seed=0), random_images(3, seed=1).requires_grad_(True)
    loss = loss_fn(src, gen, "red circle", "blue circle", reduction="none")
    d_img = loss_fn.encode_images(gen) - loss_fn.encode_images(src)
    expected = 1 - F.cosine_similarity(d_img, loss_fn.text_direction("red circle", "blue circle")[None], dim=-1)
    torch.testing.assert_close(loss, expected)
    loss.mean().backward()
    assert gen.grad is not None and gen.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in loss_fn.clip_model.parameters())


def test_clip_stays_in_eval_mode(loss_fn):
    loss_fn.train()
    assert not loss_fn.clip_model.training


def test_global_term(clip_model, tokenizer):
    plain = CLIPDirectionalLoss(clip_model, tokenizer, templates=("a {}.",))
    with_global = CLIPDirectionalLoss(clip_model, tokenizer, templates=("a {}.",), global_weight=0.5)
    src, gen = random_images(2, seed=0), random_images(2, seed=1)
    target = with_global.template_embedding("blue circle")
    expected = plain(src, gen, "red circle", "blue circle", reduction="none") + 0.5 * (
        1 - F.cosine_similarity(with_global.encode_images(gen), target[None], dim=-1)
    )
    torch.testing.assert_close(with_global(src, gen, "red circle", "blue circle", reduction="none"), expected)


def test_image_set_direction_replaces_text(loss_fn):
    a, b = random_images(4, seed=2), random_images(4, seed=3)
    direction = loss_fn.image_set_direction(a, b)
    assert torch.linalg.norm(direction).item() == pytest.approx(1.0, abs=1e-6)
    loss = loss_fn(a, b, text_direction=direction)
    assert 0.0 <= loss.item() < 1.0  # the set direction agrees on average with the pairwise directions


def test_forward_validation(loss_fn):
    with pytest.raises(ValueError, match="same shape"):
        loss_fn(random_images(2), random_images(3), "red circle", "blue circle")
    with pytest.raises(ValueError, match="`text_direction`"):
        loss_fn(random_images(2), random_images(2))
    with pytest.raises(ValueError, match="`reduction`"):
        loss_fn(random_images(2), random_images(2), "a", "b", reduction="sum")


def test_augmented_views_pair_source_and_generated(clip_model, tokenizer):
    loss_fn = CLIPDirectionalLoss(clip_model, tokenizer, templates=("a {}.",), num_augmentations=3, seed=1)
    x = random_images(2)
    src_views, gen_views = loss_fn.augment(x, x.clone())
    assert src_views.shape == (6, 3, 16, 16)
    assert torch.equal(src_views, gen_views)  # the same view of source and generated image
    constant = torch.full((1, 3, 16, 16), 0.3)
    torch.testing.assert_close(loss_fn.augment(constant, constant)[0], constant.expand(3, -1, -1, -1))


def test_augmentation_noise_is_paired_and_has_the_given_std(clip_model, tokenizer):
    kw = dict(templates=("a {}.",), num_augmentations=8, augmentation_shift=0.0, seed=2)
    noisy = CLIPDirectionalLoss(clip_model, tokenizer, augmentation_noise=0.25, **kw)
    constant = torch.full((4, 3, 16, 16), 0.3)
    src_views, gen_views = noisy.augment(constant, constant + 0.5)
    torch.testing.assert_close(gen_views - src_views, torch.full_like(gen_views, 0.5))  # same noise on both
    noise = src_views - 0.3
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 0.25) < 0.01
    plain = CLIPDirectionalLoss(clip_model, tokenizer, **kw).augment(constant, constant)[0]
    torch.testing.assert_close(plain, constant.repeat(8, 1, 1, 1))
    with pytest.raises(ValueError, match="`augmentation_noise`"):
        CLIPDirectionalLoss(clip_model, tokenizer, augmentation_noise=-0.1)


def test_augmented_loss_is_seeded_and_per_sample(clip_model, tokenizer):
    src, gen = random_images(2, seed=0), random_images(2, seed=1)

    def make(seed):
        return CLIPDirectionalLoss(clip_model, tokenizer, templates=("a {}.",), num_augmentations=4, seed=seed)

    a = make(0)(src, gen, "red circle", "blue circle", reduction="none")
    b = make(0)(src, gen, "red circle", "blue circle", reduction="none")
    c = make(1)(src, gen, "red circle", "blue circle", reduction="none")
    assert a.shape == (2,) and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="`num_augmentations`"):
        CLIPDirectionalLoss(clip_model, tokenizer, num_augmentations=-1)
    with pytest.raises(ValueError, match="`augmentation_shift`"):
        CLIPDirectionalLoss(clip_model, tokenizer, augmentation_shift=0.7)


def test_precomputed_source_embeddings_give_the_same_loss(loss_fn):
    src, gen = random_images(2, seed=0), random_images(2, seed=1)
    reused = loss_fn(src, gen, "red circle", "blue circle", source_embeds=loss_fn.encode_images(src))
    torch.testing.assert_close(reused, loss_fn(src, gen, "red circle", "blue circle"))


def test_source_embeddings_not_reusable_with_augmentations(clip_model, tokenizer):
    loss_fn = CLIPDirectionalLoss(clip_model, tokenizer, templates=("a {}.",), num_augmentations=2)
    src = random_images(1)
    with pytest.raises(ValueError, match="`source_embeds`"):
        loss_fn(src, src, "a", "b", source_embeds=loss_fn.encode_images(src))


def test_unknown_words_are_those_the_tokenizer_only_spells_out(tokenizer):
    # the tiny tokenizer merges "red", "blue", "circle", ... into one token each; other words fall back to characters
    assert unknown_words(tokenizer, "a photo of a red circle") == []
    assert unknown_words(tokenizer, "A Cat, a dog and a CAT: 2024 dogs!") == ["Cat", "dog", "and", "dogs"]
    assert unknown_words(tokenizer, "ox") == []  # two characters or fewer: too short to tell
    assert tokenizer.tokenize("cat") == ["c", "a", "t</w>"]


def test_unknown_words_with_a_tokenizer_that_has_an_unk_token():
    class WordTokenizer:  # a word-level vocabulary with an unknown token, as BERT-style tokenizers have
        unk_token = "[UNK]"

        def tokenize(self, word):
            return [word.lower()] if word.lower() in {"face", "smiling"} else ["[UNK]"]

    assert unknown_words(WordTokenizer(), "smiling face of Zeus") == ["of", "Zeus"]

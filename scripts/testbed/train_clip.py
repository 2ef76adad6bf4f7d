"""Train the test-bed's tiny CLIP (transformers ``CLIPModel``) and build its in-memory ``CLIPTokenizer``.

Model: ViT (hidden 128, 4 layers, 4 heads, patch 4 on 32 px) + text transformer (hidden 64, 2 layers, 4 heads,
16 positions), projection 64. Tokenizer: byte-level BPE over the world's vocabulary (256 byte characters, the
same with ``</w>``, whole-word merges for colours, shapes and template words, ``<|startoftext|>``,
``<|endoftext|>``; pad = eos, and the text config's ``eos_token_id`` is the tokenizer's eos id because CLIP
pools at the first eos).

Training data is rendered on the fly (batch 128). Captions: a random template with "{colour} {shape}"; 15 % name only
the colour ("a red shape") and 10 % only the shape ("a circle"). By default 20 % of the images have a blended colour
``lerp(c1, c2, lam)`` with a soft colour label (``--mix-frac``); the shipped first CLIP was trained so, 1200 steps.
Options measured since (docs/testbed-experiments.md), shipped as the second CLIP (``clip_2/``): ``--mix-frac 0
--off-frac 0.3 --tint-frac 0.25`` draws 30 % of the images in a random colour at RGB distance >= 50 from every palette
colour (the jitter reaches 17; half uniform in the RGB cube, half just outside a palette colour: darker, paler,
over-saturated or shifted shades), captioned with the nearest of 14 extra colour names (orange, purple, pink, ...),
and gives 25 % a background tinted 2-15 % towards the object's own or a random colour, their colour label weighted 0.3
(for a colour caption the untinted scene is the better match). With the default data the text "a red square" scores an
over-saturated red above the palette red for 58 % of scenes and a pink-tinted background above a white one for 91 %
(`colour_peak`), and DiffusionCLIP fine-tuning climbs exactly there (orange for yellow, brownish red, tinted
backgrounds); with the options both are 100 % palette-first after 3000 steps, but fine-tuning with that CLIP alone
often settled on a wrong palette colour (red -> green); averaged with the first CLIP, the edited colour was right in
94-100 % of edits (docs/testbed-experiments.md, "Two CLIPs"). Loss: symmetric contrastive cross-entropy with
*multi-positive* soft targets -- the target weight of (image i, text j) is the product of the image's label mass on
the colour and on the shape the text names (1 for an attribute the text does not name), normalised per row / column.
Images enter at world size in [0, 1], normalised with the OpenAI CLIP mean/std.

Evaluation every `--eval-every` steps on 256 fresh images (seed 4242): zero-shot argmax over the 12 prompts
"a photo of a {colour} {shape}" -> colour / shape / joint accuracy, and the cosine between image and text
directions for colour swaps with identical geometry (mean over 64 pairs); and `colour_peak` on 128 scenes.

Outputs under ``--out`` (default ``build/testbed/clip``): ``ckpt.pt`` (resumable), ``clip/`` and
``tokenizer/`` (save_pretrained, refreshed at every evaluation), ``log.jsonl``.

Run time (measured): about 0.2 s per step on 1 thread next to the DDPM run, 0.25 s on 2 threads with the
off-palette and tint images; 3000 steps about 12 min.

Usage::

    python scripts/testbed/train_clip.py --max-steps 1200                # the shipped CLIP
    python scripts/testbed/train_clip.py --max-steps 3000 --mix-frac 0 --off-frac 0.3 --tint-frac 0.25 \
        --out build/testbed/clip2                                          # the shipped second CLIP
    python scripts/testbed/train_clip.py --max-steps 5000 --resume
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers.convert_slow_tokenizer import bytes_to_unicode  # the GPT-2 / CLIP byte table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402,I001
    OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, jsonl_logger, restore_checkpoint, save_checkpoint, set_lr, world,
)  # fmt: skip

TEMPLATE_WORDS = (
    "a",
    "an",
    "the",
    "photo",
    "picture",
    "image",
    "drawing",
    "of",
    "on",
    "white",
    "shape",
    "thing",
    "colored",
    "coloured",
    "in",
    "with",
    "background",
    "small",
    "large",
    "big",
)
COLOUR_ONLY = ("a {} shape", "a {} thing", "something {}")
SHAPE_ONLY = ("a {}", "a photo of a {}", "a drawing of a {}")


# Colours the world never draws but a CLIP must know, so that "red" does not also mean every shade near red:
# off-palette training images are captioned with the nearest of these names (see `make_batch`).
EXTRA_COLOURS: dict[str, tuple[int, int, int]] = {
    "orange": (255, 140, 0), "purple": (130, 40, 160), "pink": (255, 150, 200), "cyan": (0, 200, 220),
    "brown": (130, 80, 30), "olive": (128, 128, 0), "grey": (128, 128, 128), "black": (20, 20, 20),
    "maroon": (120, 10, 20), "navy": (10, 20, 110), "lime": (150, 255, 50), "violet": (180, 100, 255),
    "teal": (0, 128, 128), "magenta": (255, 0, 255),
}  # fmt: skip
OFF_PALETTE_MIN_DISTANCE = 50.0  # RGB distance from every palette colour (and from white) of an off-palette colour
# A tinted-background image still shows its caption's colour, but less purely: its colour label weighs 0.3, so
# for the text "a red square" (the text-side softmax) a white background scores higher than a tinted one.
TINT_LABEL_WEIGHT = 0.3


def world_words(extra_colours: bool = False) -> list[str]:
    words = list(world.COLOURS) + (list(EXTRA_COLOURS) if extra_colours else [])
    words += list(world.SHAPES) + list(TEMPLATE_WORDS) + ["something"]
    for t in world.TEMPLATES:
        words += [w for w in t.replace("{}", " ").split() if w]
    return list(dict.fromkeys(words))


def build_tokenizer(model_max_length: int = 16, extra_colours: bool = False):
    """In-memory ``CLIPTokenizer`` whose BPE merges every world word (and the extra colour names) into one token."""
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    seen = set()
    for word in world_words(extra_colours):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        cur = pieces[0]
        for piece in pieces[1:]:
            pair = (cur, piece)
            cur = cur + piece
            if pair not in seen:  # merges must be tuples (tokenizers 0.23)
                seen.add(pair)
                merges.append(pair)
            if cur not in vocab:
                vocab[cur] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def build_clip(tokenizer, image_size: int):
    from transformers import CLIPConfig, CLIPModel

    v = len(tokenizer)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=v,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=4,
        ),
        projection_dim=64,
    )
    return CLIPModel(cfg)


def _feat(o):
    return o if torch.is_tensor(o) else o.pooler_output


def normalise(x01: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (x01 - mean) / std


def image_features(clip, imgs_uint8: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(imgs_uint8).permute(0, 3, 1, 2).float() / 255.0
    return F.normalize(_feat(clip.get_image_features(pixel_values=normalise(x))), dim=-1)


def text_features(clip, tok, texts: list[str]) -> torch.Tensor:
    enc = tok(texts, padding="max_length", truncation=True, return_tensors="pt")
    return F.normalize(
        _feat(clip.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)), dim=-1
    )


_PAL = np.array([world.COLOURS[c] for c in world.COLOURS], np.float64)
_EXTRA = np.array(list(EXTRA_COLOURS.values()), np.float64)
NC, NS = len(world.COLOURS), len(world.SHAPES)
COLOUR_NAMES = list(world.COLOURS)
ALL_COLOURS = COLOUR_NAMES + list(EXTRA_COLOURS)  # caption colour ids index this list
NA = len(ALL_COLOURS)


def off_palette_colours(rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` random RGB colours at distance >= OFF_PALETTE_MIN_DISTANCE from every palette colour and from white,
    and the index (into ALL_COLOURS) of the nearest extra colour name of each.

    Half are uniform in the RGB cube, half lie just outside a palette colour (50-100 away in a random direction,
    clipped to the cube: darker, paler, over-saturated or shifted shades), where fine-tuning looks first."""
    out = np.empty((0, 3))
    while len(out) < k:
        c = rng.uniform(0, 255, (4 * k, 3))
        near = rng.random(4 * k) < 0.5
        d = rng.normal(size=(int(near.sum()), 3))
        d *= rng.uniform(OFF_PALETTE_MIN_DISTANCE, 2 * OFF_PALETTE_MIN_DISTANCE, (len(d), 1)) / np.linalg.norm(
            d, axis=1, keepdims=True
        )
        c[near] = np.clip(_PAL[rng.integers(0, NC, len(d))] + d, 0, 255)
        far = np.linalg.norm(c[:, None] - np.vstack([_PAL, [[255, 255, 255]]])[None], axis=-1).min(1)
        out = np.vstack([out, c[far >= OFF_PALETTE_MIN_DISTANCE]])
    out = out[:k]
    nearest = np.linalg.norm(out[:, None] - _EXTRA[None], axis=-1).argmin(1)
    return np.rint(out).astype(np.uint8), NC + nearest


def make_batch(
    rng: np.random.Generator,
    n: int,
    size: int,
    mix_frac: float,
    noise_frac: float,
    off_frac: float = 0.0,
    tint_frac: float = 0.0,
):
    """Images (uint8), per-image soft colour labels (n, NA), shape one-hots (n, 3), and captions with their
    (colour id or -1, shape id or -1).

    ``off_frac`` of the images are drawn in an off-palette colour, labelled with its nearest extra colour name;
    ``tint_frac`` have their background tinted 2-15 % towards the object's own or a random colour; their colour
    label weighs TINT_LABEL_WEIGHT, so a colour caption prefers the untinted scene (fine-tuning loses by tinting)."""
    p = world.sample_batch(rng, n, size)
    col = np.eye(NA)[p["colour_id"]]
    mix = rng.random(n) < mix_frac
    if mix.any():
        k = int(mix.sum())
        other = (p["colour_id"][mix] + rng.integers(1, NC, k)) % NC
        lam = rng.uniform(0.0, 1.0, k)
        rgb = (1 - lam)[:, None] * _PAL[p["colour_id"][mix]] + lam[:, None] * _PAL[other]
        rgb += rng.integers(-world.JITTER, world.JITTER + 1, (k, 3))
        p["rgb"][mix] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
        col[mix] = (1 - lam)[:, None] * np.eye(NA)[p["colour_id"][mix]] + lam[:, None] * np.eye(NA)[other]
    off = (rng.random(n) < off_frac) & ~mix if off_frac > 0 else np.zeros(n, bool)  # default: the old RNG stream
    if off.any():
        p["rgb"][off], ids = off_palette_colours(rng, int(off.sum()))
        col[off] = np.eye(NA)[ids]
    imgs = world.render_batch(p, size)
    tint = rng.random(n) < tint_frac if tint_frac > 0 else np.zeros(n, bool)
    if tint.any():
        k = int(tint.sum())
        bg = (imgs[tint] == world.WHITE).all(-1, keepdims=True)
        lam = rng.uniform(0.02, 0.15, (k, 1, 1, 1))
        own = rng.random(k) < 0.5  # half towards the object's own colour: the tint fine-tuning finds
        colour = np.where(own[:, None], p["rgb"][tint].astype(np.float64), rng.uniform(0, 255, (k, 3)))
        tinted = np.rint(world.WHITE * (1 - lam) + colour[:, None, None, :] * lam).astype(np.uint8)
        imgs[tint] = np.where(bg, tinted, imgs[tint])
        col[tint] *= TINT_LABEL_WEIGHT
    noisy = rng.random(n) < noise_frac
    if noisy.any():
        sig = rng.uniform(0, 8, (int(noisy.sum()), 1, 1, 1))
        imgs[noisy] = np.clip(imgs[noisy] + rng.normal(0, 1, imgs[noisy].shape) * sig, 0, 255).astype(np.uint8)
    shp = np.eye(NS)[p["shape_id"]]
    # captions: random class (not tied to the images), so every batch has all kinds of text
    texts, tc, ts = [], [], []
    for _ in range(n):
        c = int(rng.integers(NC)) if off_frac == 0 or rng.random() < 0.6 else int(rng.integers(NC, NA))
        s = int(rng.integers(NS))
        u = rng.random()
        if u < 0.15:
            texts.append(COLOUR_ONLY[rng.integers(len(COLOUR_ONLY))].format(ALL_COLOURS[c]))
            s = -1
        elif u < 0.25:
            texts.append(SHAPE_ONLY[rng.integers(len(SHAPE_ONLY))].format(world.SHAPES[s]))
            c = -1
        else:
            template = world.TEMPLATES[rng.integers(len(world.TEMPLATES))]
            texts.append(template.format(f"{ALL_COLOURS[c]} {world.SHAPES[s]}"))
        tc.append(c)
        ts.append(s)
    # make the first n//2 captions describe the first n//2 images exactly (guaranteed positives)
    for i in range(n // 2):
        if not mix[i]:
            c, s = int(col[i].argmax()), int(p["shape_id"][i])
            template = world.TEMPLATES[rng.integers(len(world.TEMPLATES))]
            texts[i] = template.format(f"{ALL_COLOURS[c]} {world.SHAPES[s]}")
            tc[i], ts[i] = c, s
    return imgs, col, shp, texts, np.array(tc), np.array(ts)


def match_matrix(col, shp, tc, ts) -> torch.Tensor:
    """m[i, j] = (colour mass of image i on text j's colour, or 1) * (shape mass ..., or 1)."""
    cm = np.where(tc[None, :] >= 0, col[:, np.clip(tc, 0, None)], 1.0)
    sm = np.where(ts[None, :] >= 0, shp[:, np.clip(ts, 0, None)], 1.0)
    return torch.from_numpy(cm * sm).float()


@torch.no_grad()
def colour_peak(clip, tok, size: int, n: int = 128, seed: int = 4343) -> dict:
    """Does the text "a {colour} {shape}" score the palette colour above off-palette ones? (DiffusionCLIP climbs
    this score: where an off-palette colour scores higher, fine-tuning drifts to it.)

    For `n` scenes, the cosine between the image embedding and its caption's text embedding is compared with the
    same scene drawn in an off-palette colour (RGB distance 60-120 from the palette colour) and on a background
    tinted 6 % towards the palette colour. Returns the fraction of pairs where the palette image scores higher.
    """
    rng = np.random.default_rng(seed)
    imgs, metas = world.render_dataset(n, seed=seed, size=size)
    a = np.stack([np.asarray(i) for i in imgs])
    off, mixed, saturated, tint = a.copy(), a.copy(), a.copy(), a.copy()
    for k, m in enumerate(metas):
        rgb = np.array(world.COLOURS[m["colour"]], np.float64)
        while True:
            d = rng.normal(size=3)
            new = rgb + d / np.linalg.norm(d) * rng.uniform(60, 120)
            if ((new >= 0) & (new <= 255)).all():
                break
        other_id = (COLOUR_NAMES.index(m["colour"]) + int(rng.integers(1, NC))) % NC
        other = np.array(world.COLOURS[COLOUR_NAMES[other_id]], np.float64)
        fg = (a[k] != 255).any(-1)
        off[k][fg] = np.rint(new).astype(np.uint8)
        mixed[k][fg] = np.rint(rgb + rng.uniform(0.25, 0.5) * (other - rgb)).astype(np.uint8)
        saturated[k][fg] = np.rint(np.clip(rgb + 0.6 * (rgb - rgb.mean()), 0, 255)).astype(np.uint8)
        tint[k][~fg] = np.rint(255 * 0.94 + rgb * 0.06).astype(np.uint8)
    tf = text_features(clip, tok, [f"a {m['colour']} {m['shape']}" for m in metas])
    score = [(image_features(clip, x) * tf).sum(-1) for x in (a, off, mixed, saturated, tint)]
    names = ("off_palette", "mixed", "saturated", "tinted_background")
    return {f"peak_vs_{name}": float((score[0] > sc).float().mean()) for name, sc in zip(names, score[1:])}


@torch.no_grad()
def evaluate(clip, tok, size: int, n: int = 256, seed: int = 4242) -> dict:
    """Zero-shot colour / shape / joint accuracy on `n` fresh images and the mean image-vs-text direction cosine
    over 64 same-geometry colour swaps."""
    was_training = clip.training
    clip.eval()
    imgs, metas = world.render_dataset(n, seed=seed, size=size)
    arr = np.stack([np.asarray(i) for i in imgs])
    classes = [(c, s) for c in world.COLOURS for s in world.SHAPES]
    tf = text_features(clip, tok, [f"a photo of a {c} {s}" for c, s in classes])
    pred = (image_features(clip, arr) @ tf.T).argmax(-1).numpy()
    pc = np.array([classes[k][0] for k in pred])
    ps = np.array([classes[k][1] for k in pred])
    tcol = np.array([m["colour"] for m in metas])
    tshp = np.array([m["shape"] for m in metas])
    # directional consistency: same geometry, colour swapped
    rng = np.random.default_rng(seed + 1)
    cos = []
    for m in metas[:64]:
        tgt = COLOUR_NAMES[(COLOUR_NAMES.index(m["colour"]) + int(rng.integers(1, NC))) % NC]
        a = np.asarray(world.render_shape(m["shape"], m["colour"], m["cx"], m["cy"], m["r"], size))
        b = np.asarray(world.render_shape(m["shape"], tgt, m["cx"], m["cy"], m["r"], size))
        fi = image_features(clip, np.stack([a, b]))
        ft = text_features(clip, tok, [f"a {m['colour']} {m['shape']}", f"a {tgt} {m['shape']}"])
        cos.append(float(F.cosine_similarity(fi[1] - fi[0], ft[1] - ft[0], dim=0)))
    clip.train(was_training)
    return {
        "colour_acc": float((pc == tcol).mean()),
        "shape_acc": float((ps == tshp).mean()),
        "joint_acc": float(((pc == tcol) & (ps == tshp)).mean()),
        "dir_cos": float(np.mean(cos)),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="build/testbed/clip")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--mix-frac", type=float, default=0.2)
    p.add_argument("--noise-frac", type=float, default=0.3)
    p.add_argument("--off-frac", type=float, default=0.0, help="off-palette images (see make_batch)")
    p.add_argument("--tint-frac", type=float, default=0.0, help="images with a tinted background")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    log = jsonl_logger(args.out)

    torch.manual_seed(args.seed)
    tok = build_tokenizer(extra_colours=args.off_frac > 0)
    clip = build_clip(tok, args.size).train()
    opt = torch.optim.AdamW(clip.parameters(), lr=args.lr, weight_decay=0.01)
    rng = np.random.default_rng(args.seed)
    step = 0
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    ck = restore_checkpoint(ckpt_path, args.resume, clip, opt, rng=rng)
    if ck is not None:
        step = ck["step"]
        log({"kind": "resume", "step": step})
    else:
        log(
            {
                "kind": "start",
                "args": vars(args),
                "params": sum(q.numel() for q in clip.parameters()),
                "vocab": len(tok),
            }
        )

    def lr_at(s):
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        q = min(1.0, (s - args.warmup) / max(1, args.max_steps - args.warmup))
        return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * q)))

    t_last, run_loss, run_n = time.time(), 0.0, 0
    while step < args.max_steps:
        set_lr(opt, lr_at(step))
        imgs, col, shp, texts, tc, ts = make_batch(
            rng, args.batch, args.size, args.mix_frac, args.noise_frac, args.off_frac, args.tint_frac
        )
        fi = image_features(clip, imgs)
        ft = text_features(clip, tok, texts)
        logits = clip.logit_scale.exp().clamp(max=100) * fi @ ft.T
        m = match_matrix(col, shp, tc, ts)
        row = m / m.sum(1, keepdim=True).clamp(min=1e-8)
        colm = m / m.sum(0, keepdim=True).clamp(min=1e-8)
        has_r = m.sum(1) > 0
        has_c = m.sum(0) > 0
        li = -(row * logits.log_softmax(1)).sum(1)[has_r].mean()
        lt = -(colm * logits.log_softmax(0)).sum(0)[has_c].mean()
        loss = (li + lt) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        run_loss += float(loss.detach())
        run_n += 1
        if step % 50 == 0:
            log(
                {
                    "kind": "train",
                    "step": step,
                    "loss": round(run_loss / run_n, 4),
                    "lr": round(lr_at(step), 6),
                    "scale": round(float(clip.logit_scale.detach().exp()), 2),
                    "s_per_step": round((time.time() - t_last) / run_n, 3),
                }
            )
            t_last, run_loss, run_n = time.time(), 0.0, 0
        if step % args.eval_every == 0 or step == args.max_steps:
            ev = evaluate(clip, tok, args.size)
            ev.update(colour_peak(clip, tok, args.size))
            ev.update(kind="eval", step=step)
            log(ev)
            save_checkpoint(ckpt_path, clip, opt, rng=rng, step=step, args=args)
            clip.save_pretrained(os.path.join(args.out, "clip"))
            tok.save_pretrained(os.path.join(args.out, "tokenizer"))
            t_last = time.time()
    log({"kind": "done", "step": step})


if __name__ == "__main__":
    main()

"""Train the test-bed's tiny CLIP (transformers ``CLIPModel``) and build its in-memory ``CLIPTokenizer``.

Model: ViT (hidden 128, 4 layers, 4 heads, patch 4 on 32 px) + text transformer (hidden 64, 2 layers, 4 heads,
16 positions), projection 64. Tokenizer: byte-level BPE over the world's vocabulary (256 byte characters, the
same with ``</w>``, whole-word merges for colours, shapes and template words, ``<|startoftext|>``,
``<|endoftext|>``; pad = eos, and the text config's ``eos_token_id`` is the tokenizer's eos id because CLIP
pools at the first eos).

Training data is rendered on the fly (batch 128). Captions: a random template with "{colour} {shape}"; 15 %
name only the colour ("a red shape") and 10 % only the shape ("a circle"). 20 % of the images have a blended
colour ``lerp(c1, c2, lam)`` with a soft colour label, so that image embeddings move smoothly between colours
(useful for DiffusionCLIP's directional loss). Loss: symmetric contrastive cross-entropy with *multi-positive*
soft targets -- the target weight of (image i, text j) is the product of the image's label mass on the colour
and on the shape the text names (1 for an attribute the text does not name), normalised per row / column.
Images enter at world size in [0, 1], normalised with the OpenAI CLIP mean/std.

Evaluation every `--eval-every` steps on 256 fresh images (seed 4242): zero-shot argmax over the 12 prompts
"a photo of a {colour} {shape}" -> colour / shape / joint accuracy, and the cosine between image and text
directions for colour swaps with identical geometry (mean over 64 pairs).

Outputs under ``--out`` (default ``build/testbed/clip``): ``ckpt.pt`` (resumable), ``clip/`` and
``tokenizer/`` (save_pretrained, refreshed at every evaluation), ``log.jsonl``.

Run time (measured, 1 thread, next to the DDPM run): about 0.2 s per step; 3000 steps about 12 min.

Usage::

    python scripts/testbed/train_clip.py --max-steps 3000
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, jsonl_logger, world  # noqa: E402

TEMPLATE_WORDS = ("a", "an", "the", "photo", "picture", "image", "drawing", "of", "on", "white", "shape", "thing",
                  "colored", "coloured", "in", "with", "background", "small", "large", "big")
COLOUR_ONLY = ("a {} shape", "a {} thing", "something {}")
SHAPE_ONLY = ("a {}", "a photo of a {}", "a drawing of a {}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def world_words() -> list[str]:
    words = list(world.COLOURS) + list(world.SHAPES) + list(TEMPLATE_WORDS) + ["something"]
    for t in world.TEMPLATES:
        words += [w for w in t.replace("{}", " ").split() if w]
    return list(dict.fromkeys(words))


def build_tokenizer(model_max_length: int = 16):
    """In-memory ``CLIPTokenizer`` whose BPE merges every world word into one token."""
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    seen = set()
    for word in world_words():
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
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length,
                         unk_token="<|endoftext|>", bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>")


def build_clip(tokenizer, image_size: int):
    from transformers import CLIPConfig, CLIPModel

    v = len(tokenizer)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                           image_size=image_size, patch_size=4),
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
    return F.normalize(_feat(clip.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)),
                       dim=-1)


_PAL = np.array([world.COLOURS[c] for c in world.COLOURS], np.float64)
NC, NS = len(world.COLOURS), len(world.SHAPES)
COLOUR_NAMES = list(world.COLOURS)


def make_batch(rng: np.random.Generator, n: int, size: int, mix_frac: float, noise_frac: float):
    """Images (uint8), per-image soft colour labels (n, 4), shape one-hots (n, 3), and captions with their
    (colour id or -1, shape id or -1)."""
    p = world.sample_batch(rng, n, size)
    col = np.eye(NC)[p["colour_id"]]
    mix = rng.random(n) < mix_frac
    if mix.any():
        k = int(mix.sum())
        other = (p["colour_id"][mix] + rng.integers(1, NC, k)) % NC
        lam = rng.uniform(0.0, 1.0, k)
        rgb = (1 - lam)[:, None] * _PAL[p["colour_id"][mix]] + lam[:, None] * _PAL[other]
        rgb += rng.integers(-world.JITTER, world.JITTER + 1, (k, 3))
        p["rgb"][mix] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
        col[mix] = (1 - lam)[:, None] * np.eye(NC)[p["colour_id"][mix]] + lam[:, None] * np.eye(NC)[other]
    imgs = world.render_batch(p, size)
    noisy = rng.random(n) < noise_frac
    if noisy.any():
        sig = rng.uniform(0, 8, (int(noisy.sum()), 1, 1, 1))
        imgs[noisy] = np.clip(imgs[noisy] + rng.normal(0, 1, imgs[noisy].shape) * sig, 0, 255).astype(np.uint8)
    shp = np.eye(NS)[p["shape_id"]]
    # captions: random class (not tied to the images), so every batch has all kinds of text
    texts, tc, ts = [], [], []
    for _ in range(n):
        c, s = int(rng.integers(NC)), int(rng.integers(NS))
        u = rng.random()
        if u < 0.15:
            texts.append(COLOUR_ONLY[rng.integers(len(COLOUR_ONLY))].format(COLOUR_NAMES[c]))
            s = -1
        elif u < 0.25:
            texts.append(SHAPE_ONLY[rng.integers(len(SHAPE_ONLY))].format(world.SHAPES[s]))
            c = -1
        else:
            template = world.TEMPLATES[rng.integers(len(world.TEMPLATES))]
            texts.append(world.caption(COLOUR_NAMES[c], world.SHAPES[s], template))
        tc.append(c)
        ts.append(s)
    # make the first n//2 captions describe the first n//2 images exactly (guaranteed positives)
    for i in range(n // 2):
        if not mix[i]:
            c, s = int(p["colour_id"][i]), int(p["shape_id"][i])
            template = world.TEMPLATES[rng.integers(len(world.TEMPLATES))]
            texts[i] = world.caption(COLOUR_NAMES[c], world.SHAPES[s], template)
            tc[i], ts[i] = c, s
    return imgs, col, shp, texts, np.array(tc), np.array(ts)


def match_matrix(col, shp, tc, ts) -> torch.Tensor:
    """m[i, j] = (colour mass of image i on text j's colour, or 1) * (shape mass ..., or 1)."""
    cm = np.where(tc[None, :] >= 0, col[:, np.clip(tc, 0, None)], 1.0)
    sm = np.where(ts[None, :] >= 0, shp[:, np.clip(ts, 0, None)], 1.0)
    return torch.from_numpy(cm * sm).float()


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
    return {"colour_acc": float((pc == tcol).mean()), "shape_acc": float((ps == tshp).mean()),
            "joint_acc": float(((pc == tcol) & (ps == tshp)).mean()), "dir_cos": float(np.mean(cos))}


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
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    log = jsonl_logger(args.out)

    torch.manual_seed(args.seed)
    tok = build_tokenizer()
    clip = build_clip(tok, args.size).train()
    opt = torch.optim.AdamW(clip.parameters(), lr=args.lr, weight_decay=0.01)
    rng = np.random.default_rng(args.seed)
    step = 0
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if args.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, weights_only=False)
        clip.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        rng.bit_generator.state = ck["np_rng"]
        torch.set_rng_state(ck["torch_rng"])
        step = ck["step"]
        log({"kind": "resume", "step": step})
    else:
        log({"kind": "start", "args": vars(args), "params": sum(q.numel() for q in clip.parameters()),
             "vocab": len(tok)})

    def lr_at(s):
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        q = min(1.0, (s - args.warmup) / max(1, args.max_steps - args.warmup))
        return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * q)))

    t_last, run_loss, run_n = time.time(), 0.0, 0
    while step < args.max_steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        imgs, col, shp, texts, tc, ts = make_batch(rng, args.batch, args.size, args.mix_frac, args.noise_frac)
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
            log({"kind": "train", "step": step, "loss": round(run_loss / run_n, 4), "lr": round(lr_at(step), 6),
                 "scale": round(float(clip.logit_scale.detach().exp()), 2),
                 "s_per_step": round((time.time() - t_last) / run_n, 3)})
            t_last, run_loss, run_n = time.time(), 0.0, 0
        if step % args.eval_every == 0 or step == args.max_steps:
            ev = evaluate(clip, tok, args.size)
            ev.update(kind="eval", step=step)
            log(ev)
            tmp = ckpt_path + ".tmp"
            torch.save({"model": clip.state_dict(), "opt": opt.state_dict(), "np_rng": rng.bit_generator.state,
                        "torch_rng": torch.get_rng_state(), "step": step, "args": vars(args)}, tmp)
            os.replace(tmp, ckpt_path)
            clip.save_pretrained(os.path.join(args.out, "clip"))
            tok.save_pretrained(os.path.join(args.out, "tokenizer"))
            t_last = time.time()
    log({"kind": "done", "step": step})


if __name__ == "__main__":
    main()

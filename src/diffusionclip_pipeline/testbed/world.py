"""The test-bed world: one flat-coloured shape on a white background.

The world is small enough that a tiny DDPM and a tiny CLIP learn it on a CPU, and simple enough that an edit
can be scored by measurement instead of by eye. Everything here uses numpy and PIL only.

Geometry (side ``S = size`` pixels, pixel centres at integer + 0.5, hard edges, no anti-aliasing):

- circle:   ``(x - cx)**2 + (y - cy)**2 <= r**2``
- square:   ``|x - cx| <= 0.8 r`` and ``|y - cy| <= 0.8 r``
- triangle: upright equilateral triangle with circumradius ``r``, vertices ``(cx, cy - r)`` and
  ``(cx +- sqrt(3)/2 r, cy + r/2)``

``r`` is uniform in ``[0.18 S, 0.34 S]`` and the shape's bounding box lies inside ``[1, S - 1]`` (at least one
pixel of margin). Colours are the :data:`COLOURS` palette with every channel jittered uniformly by +-10
(integers) per image.

Measurements (all accept a PIL image or a uint8 ``H x W x 3`` array): :func:`foreground_mask`,
:func:`dominant_colour`, :func:`colour_fraction`, :func:`mask_iou`, :func:`background_change`,
:func:`is_clean_shape`, :func:`shape_scores`, :func:`classify_shape` and :func:`edit_success`.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

__all__ = [
    "COLOURS",
    "SHAPES",
    "TEMPLATES",
    "DEFAULT_SIZE",
    "render_shape",
    "render_batch",
    "sample_scene",
    "sample_batch",
    "render_dataset",
    "caption",
    "to_array",
    "foreground_mask",
    "nearest_palette",
    "dominant_colour",
    "colour_fraction",
    "mask_iou",
    "background_change",
    "connected_components",
    "is_clean_shape",
    "clean_shape_report",
    "shape_scores",
    "classify_shape",
    "edit_success",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 200, 30),
}
"""Palette: colour name -> RGB."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""Shape names."""

TEMPLATES: tuple[str, ...] = (
    "a {}",
    "a photo of a {}",
    "a picture of a {}",
    "an image of a {}",
    "a {} on white",
    "a drawing of a {}",
)
"""Caption templates; ``{}`` is replaced by ``"{colour} {shape}"``."""

DEFAULT_SIZE = 32
R_MIN_FRAC = 0.18
R_MAX_FRAC = 0.34
SQUARE_HALF = 0.8
JITTER = 10
WHITE = 255

# defaults of the measurements (RGB units 0..255)
FG_THRESHOLD = 100
"""A pixel is foreground when some channel differs from white by more than this."""
COLOUR_RADIUS = 60.0
"""A pixel "is" a palette colour when its RGB distance to it is at most this."""

_SQRT3 = math.sqrt(3.0)
_PALETTE = np.array([COLOURS[c] for c in COLOURS], dtype=np.float64)
_COLOUR_NAMES = tuple(COLOURS)


# --------------------------------------------------------------------------------------------------------- checks
def _check_shape(shape: str, name: str = "shape") -> None:
    if shape not in SHAPES:
        raise ValueError(f"`{name}` must be one of {SHAPES}, got {shape!r}.")


def _check_colour(colour: str, name: str = "colour") -> None:
    if colour not in COLOURS:
        raise ValueError(f"`{name}` must be one of {tuple(COLOURS)}, got {colour!r}.")


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 8:
        raise ValueError(f"`size` must be an int >= 8, got {size!r}.")


def _extent(shape: str, r: float | np.ndarray) -> tuple:
    """Bounding box offsets (left, right, top, bottom) of a shape around its centre."""
    if shape == "circle":
        return r, r, r, r
    if shape == "square":
        return SQUARE_HALF * r, SQUARE_HALF * r, SQUARE_HALF * r, SQUARE_HALF * r
    return _SQRT3 / 2 * r, _SQRT3 / 2 * r, r, 0.5 * r


# --------------------------------------------------------------------------------------------------------- render
def _shape_mask(shape_ids: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, size: int) -> np.ndarray:
    """Boolean masks ``(N, size, size)`` for shape ids (index into :data:`SHAPES`)."""
    c = np.arange(size, dtype=np.float64) + 0.5
    x = c[None, None, :] - cx[:, None, None]
    y = c[None, :, None] - cy[:, None, None]
    r = r[:, None, None]
    circle = x * x + y * y <= r * r
    square = (np.abs(x) <= SQUARE_HALF * r) & (np.abs(y) <= SQUARE_HALF * r)
    # below the apex the half-width grows by 1/sqrt(3) per unit of y
    triangle = (y <= 0.5 * r) & (np.abs(x) * _SQRT3 <= y + r)
    sid = shape_ids[:, None, None]
    return np.where(sid == 0, circle, np.where(sid == 1, square, triangle))


def render_shape(
    shape: str,
    colour: str,
    cx: float,
    cy: float,
    r: float,
    size: int = DEFAULT_SIZE,
    rgb: tuple[int, int, int] | None = None,
) -> Image.Image:
    """Render one shape on white.

    Args:
        shape (`str`): one of :data:`SHAPES`.
        colour (`str`): one of :data:`COLOURS`; used when `rgb` is None.
        cx, cy (`float`): centre in pixels (pixel ``(i, j)`` has centre ``(j + 0.5, i + 0.5)``).
        r (`float`): size in pixels (radius, 1.25 x half-side, or circumradius).
        size (`int`, *optional*, defaults to 32): image side.
        rgb (`tuple[int, int, int]`, *optional*): exact fill colour (e.g. a jittered palette colour).

    Returns:
        `PIL.Image.Image`: RGB image of ``size x size``. No bounds check: shapes may be clipped by the border.
    """
    _check_shape(shape)
    _check_colour(colour)
    _check_size(size)
    if not r > 0:
        raise ValueError(f"`r` must be positive, got {r!r}.")
    fill = np.array(COLOURS[colour] if rgb is None else rgb)
    if fill.shape != (3,) or fill.min() < 0 or fill.max() > 255:
        raise ValueError(f"`rgb` must be three ints in [0, 255], got {rgb!r}.")
    mask = _shape_mask(
        np.array([SHAPES.index(shape)]), np.array([cx], float), np.array([cy], float), np.array([r], float), size
    )[0]
    img = np.full((size, size, 3), WHITE, dtype=np.uint8)
    img[mask] = fill.astype(np.uint8)
    return Image.fromarray(img, mode="RGB")


def sample_batch(
    rng: np.random.Generator, n: int, size: int = DEFAULT_SIZE, shape: str | None = None, colour: str | None = None
) -> dict[str, np.ndarray]:
    """Sample the parameters of `n` scenes at once (vectorised; used for on-the-fly training data).

    Returns a dict of arrays: ``shape_id`` (index into :data:`SHAPES`), ``colour_id`` (index into
    :data:`COLOURS`), ``cx``, ``cy``, ``r`` (float64) and ``rgb`` (``(n, 3)`` uint8, jittered).
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"`rng` must be a numpy Generator, got {type(rng).__name__}.")
    _check_size(size)
    if n < 0:
        raise ValueError(f"`n` must be >= 0, got {n}.")
    if shape is not None:
        _check_shape(shape)
    if colour is not None:
        _check_colour(colour)
    shape_id = np.full(n, SHAPES.index(shape)) if shape else rng.integers(0, len(SHAPES), n)
    colour_id = np.full(n, _COLOUR_NAMES.index(colour)) if colour else rng.integers(0, len(COLOURS), n)
    r = rng.uniform(R_MIN_FRAC * size, R_MAX_FRAC * size, n)
    left, right, top, bottom = (np.empty(n) for _ in range(4))
    for k, s in enumerate(SHAPES):
        sel = shape_id == k
        ext = _extent(s, r[sel])
        left[sel], right[sel], top[sel], bottom[sel] = ext
    cx = rng.uniform(1 + left, size - 1 - right)
    cy = rng.uniform(1 + top, size - 1 - bottom)
    jitter = rng.integers(-JITTER, JITTER + 1, (n, 3))
    rgb = np.clip(_PALETTE[colour_id].astype(np.int64) + jitter, 0, 255).astype(np.uint8)
    return {"shape_id": shape_id, "colour_id": colour_id, "cx": cx, "cy": cy, "r": r, "rgb": rgb}


def render_batch(params: dict[str, np.ndarray], size: int = DEFAULT_SIZE) -> np.ndarray:
    """Render scenes from :func:`sample_batch` parameters into a uint8 array ``(n, size, size, 3)``.

    Pixel-identical to calling :func:`render_shape` on each scene.
    """
    _check_size(size)
    mask = _shape_mask(
        np.asarray(params["shape_id"]),
        np.asarray(params["cx"], float),
        np.asarray(params["cy"], float),
        np.asarray(params["r"], float),
        size,
    )
    out = np.full(mask.shape + (3,), WHITE, dtype=np.uint8)
    rgb = np.asarray(params["rgb"], dtype=np.uint8)
    out[:] = np.where(mask[..., None], rgb[:, None, None, :], out)
    return out


def sample_scene(
    rng: np.random.Generator, size: int = DEFAULT_SIZE, shape: str | None = None, colour: str | None = None
) -> tuple[Image.Image, dict]:
    """Sample and render one scene.

    Args:
        rng (`np.random.Generator`): source of randomness.
        size (`int`, *optional*, defaults to 32): image side.
        shape, colour (`str`, *optional*): fix the shape / colour instead of sampling it.

    Returns:
        `(PIL.Image.Image, dict)`: the image and its metadata ``{"shape", "colour", "cx", "cy", "r", "rgb",
        "size", "caption"}``.
    """
    p = sample_batch(rng, 1, size, shape, colour)
    meta = {
        "shape": SHAPES[int(p["shape_id"][0])],
        "colour": _COLOUR_NAMES[int(p["colour_id"][0])],
        "cx": float(p["cx"][0]),
        "cy": float(p["cy"][0]),
        "r": float(p["r"][0]),
        "rgb": tuple(int(v) for v in p["rgb"][0]),
        "size": int(size),
    }
    meta["caption"] = caption(meta["colour"], meta["shape"])
    img = render_shape(meta["shape"], meta["colour"], meta["cx"], meta["cy"], meta["r"], size, meta["rgb"])
    return img, meta


def render_dataset(
    n: int, seed: int, size: int = DEFAULT_SIZE, shape: str | None = None, colour: str | None = None
) -> tuple[list[Image.Image], list[dict]]:
    """Render `n` scenes deterministically from an int `seed` (see :func:`sample_scene`)."""
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"`n` must be an int >= 0, got {n!r}.")
    if not isinstance(seed, (int, np.integer)):
        raise ValueError(f"`seed` must be an int, got {seed!r}.")
    rng = np.random.default_rng(seed)
    images, metas = [], []
    for _ in range(n):
        img, meta = sample_scene(rng, size, shape, colour)
        images.append(img)
        metas.append(meta)
    return images, metas


def caption(colour: str, shape: str, template: str = "a {}") -> str:
    """Caption such as ``"a photo of a red circle"``; `template` has one ``{}`` for ``"{colour} {shape}"``."""
    _check_colour(colour)
    _check_shape(shape)
    if template.count("{}") != 1:
        raise ValueError(f"`template` must contain exactly one '{{}}', got {template!r}.")
    return template.format(f"{colour} {shape}")


# --------------------------------------------------------------------------------------------------- measurements
def to_array(img) -> np.ndarray:
    """PIL image or uint8 ``H x W x 3`` array -> uint8 ``H x W x 3`` array."""
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"))
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"`img` must be a PIL image or a uint8 HxWx3 array, got {arr.dtype} {arr.shape}.")
    return arr


def foreground_mask(img, threshold: float = FG_THRESHOLD) -> np.ndarray:
    """Pixels far from white: some channel differs from 255 by more than `threshold`. Returns bool ``H x W``."""
    if not 0 <= threshold < 255:
        raise ValueError(f"`threshold` must be in [0, 255), got {threshold!r}.")
    arr = to_array(img).astype(np.int16)
    return (WHITE - arr).max(axis=-1) > threshold


def _check_mask(mask, arr) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != arr.shape[:2]:
        raise ValueError(f"`mask` must have shape {arr.shape[:2]}, got {mask.shape}.")
    return mask


def nearest_palette(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest palette colour and the RGB distance to it, for ``(..., 3)`` pixels."""
    d = np.linalg.norm(np.asarray(pixels, np.float64)[..., None, :] - _PALETTE, axis=-1)
    return d.argmin(-1), d.min(-1)


def dominant_colour(img, mask=None) -> str | None:
    """Nearest palette colour by majority vote of the foreground pixels (or of `mask`); None if empty."""
    arr = to_array(img)
    mask = foreground_mask(arr) if mask is None else _check_mask(mask, arr)
    if not mask.any():
        return None
    idx, _ = nearest_palette(arr[mask])
    return _COLOUR_NAMES[int(np.bincount(idx, minlength=len(COLOURS)).argmax())]


def colour_fraction(img, colour: str, mask=None, radius: float = COLOUR_RADIUS) -> float:
    """Share of foreground (or `mask`) pixels within RGB distance `radius` of palette `colour` (0 if empty)."""
    _check_colour(colour)
    arr = to_array(img)
    mask = foreground_mask(arr) if mask is None else _check_mask(mask, arr)
    if not mask.any():
        return 0.0
    d = np.linalg.norm(arr[mask].astype(np.float64) - np.array(COLOURS[colour], np.float64), axis=-1)
    return float((d <= radius).mean())


def mask_iou(a, b) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"`a` and `b` must have the same shape, got {a.shape} and {b.shape}.")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def background_change(src, edited, mask=None) -> float:
    """Mean absolute change (on a [0, 1] scale) over the source's background pixels (or over `mask`)."""
    a, b = to_array(src), to_array(edited)
    if a.shape != b.shape:
        raise ValueError(f"`src` and `edited` must have the same shape, got {a.shape} and {b.shape}.")
    bg = ~foreground_mask(a) if mask is None else _check_mask(mask, a)
    if not bg.any():
        return 0.0
    return float(np.abs(a[bg].astype(np.float64) - b[bg].astype(np.float64)).mean() / 255.0)


def connected_components(mask, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Label the connected components of a boolean mask (numpy only).

    Returns ``(labels, n)``: labels are 0 for background and 1..n for components (in raster order of their
    first pixel).
    """
    if connectivity not in (4, 8):
        raise ValueError(f"`connectivity` must be 4 or 8, got {connectivity!r}.")
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"`mask` must be 2-D, got shape {mask.shape}.")
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    shifts = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        shifts += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    # min-label propagation until stable (at most the longest path length; fine for small images)
    while True:
        pad = np.pad(lab, 1, constant_values=big)
        new = lab.copy()
        for dy, dx in shifts:
            new = np.minimum(new, pad[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w])
        new = np.where(mask, new, big)
        if np.array_equal(new, lab):
            break
        lab = new
    out = np.zeros((h, w), dtype=np.int64)
    roots = np.unique(lab[mask])
    for k, root in enumerate(roots, start=1):
        out[lab == root] = k
    return out, len(roots)


def clean_shape_report(
    img,
    threshold: float = FG_THRESHOLD,
    radius: float = COLOUR_RADIUS,
    min_pixels: int = 12,
    purity: float = 0.9,
    bg_max_mean: float = 0.03,
    bg_tol: int = 40,
    bg_share: float = 0.97,
) -> dict:
    """Details of :func:`is_clean_shape`.

    Checks: ``one_blob`` (exactly one 8-connected foreground component with at least `min_pixels` pixels
    and no other foreground pixels), ``one_colour`` (at least `purity` of its pixels within RGB distance
    `radius` of one palette colour), ``white_background`` (over the background pixels, mean deviation from
    white <= `bg_max_mean` on a [0, 1] scale and at least `bg_share` of them within `bg_tol` of white in every
    channel). Also returns ``colour`` (the dominant palette colour), ``n_components``, ``n_pixels``,
    ``purity`` and ``bg_mean``.
    """
    arr = to_array(img)
    fg = foreground_mask(arr, threshold)
    _, n = connected_components(fg)
    n_px = int(fg.sum())
    rep = {"n_components": n, "n_pixels": n_px, "colour": dominant_colour(arr, fg)}
    rep["one_blob"] = n == 1 and n_px >= min_pixels
    rep["purity"] = colour_fraction(arr, rep["colour"], fg, radius) if rep["colour"] else 0.0
    rep["one_colour"] = rep["purity"] >= purity
    bg = ~fg
    if bg.any():
        dev = WHITE - arr[bg].astype(np.int16)
        rep["bg_mean"] = float(np.abs(dev).mean() / 255.0)
        near = (np.abs(dev) <= bg_tol).all(-1).mean()
        rep["white_background"] = rep["bg_mean"] <= bg_max_mean and near >= bg_share
    else:
        rep["bg_mean"], rep["white_background"] = 1.0, False
    rep["clean"] = bool(rep["one_blob"] and rep["one_colour"] and rep["white_background"])
    return rep


def is_clean_shape(img, **kwargs) -> bool:
    """True when the image is one shape of one palette colour on white (see :func:`clean_shape_report`)."""
    return clean_shape_report(img, **kwargs)["clean"]


_AREA_PER_R2 = {"circle": math.pi, "square": 4 * SQUARE_HALF**2, "triangle": 3 * _SQRT3 / 4}
"""Area of each ideal shape in units of ``r**2`` (see the module's geometry)."""


def shape_scores(img_or_mask, size_search: int = 9, shift_search: int = 5) -> dict[str, float]:
    """IoU of a foreground with the best-fitting ideal shape of each kind (``{}`` when the foreground is empty).

    Each ideal shape has the foreground's area and centroid (the centroid of all three shapes is their centre ``(cx,
    cy)``: for the triangle, its circumcentre). To absorb pixelation and stray pixels, ``r`` is scanned over
    `size_search` values in +-15 % around the area-matching one, and the centre over `shift_search` values in +-1 pixel
    along each axis; the best IoU over these templates is the shape's score.

    Args:
        img_or_mask: a boolean ``H x W`` mask, or an image (PIL or uint8 ``H x W x 3``) whose
            :func:`foreground_mask` is used.
        size_search (`int`, *optional*, defaults to 9): number of radii scanned.
        shift_search (`int`, *optional*, defaults to 5): number of centre offsets per axis.

    Returns:
        `dict[str, float]`: shape name -> best IoU, in the order of :data:`SHAPES`.
    """
    if size_search < 1 or shift_search < 1:
        raise ValueError(f"`size_search` and `shift_search` must be >= 1, got {size_search} and {shift_search}.")
    m = np.asarray(img_or_mask)
    mask = m.astype(bool) if m.ndim == 2 else foreground_mask(img_or_mask)
    if not mask.any():
        return {}
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    area = float(mask.sum())
    # pixel (i, j) has centre (j + 0.5, i + 0.5)
    mx, my = xs.mean() + 0.5, ys.mean() + 0.5
    scale = np.linspace(0.85, 1.15, size_search) if size_search > 1 else np.ones(1)
    shift = np.linspace(-1.0, 1.0, shift_search) if shift_search > 1 else np.zeros(1)
    ss, dx, dy = (g.ravel() for g in np.meshgrid(scale, shift, shift, indexing="ij"))
    scores = {}
    for k, s in enumerate(SHAPES):
        r = math.sqrt(area / _AREA_PER_R2[s]) * ss
        tmpl = _shape_mask(np.full(r.size, k), mx + dx, my + dy, r, max(h, w))[:, :h, :w]
        inter = (tmpl & mask).sum((1, 2))
        union = (tmpl | mask).sum((1, 2))
        scores[s] = float((inter / union).max())
    return scores


def classify_shape(img_or_mask, size_search: int = 9, shift_search: int = 5) -> tuple[str | None, float]:
    """Nearest shape: the kind whose ideal shape of the same area and centroid overlaps the foreground best.

    Returns ``(shape, best IoU)``, or ``(None, 0.0)`` when the foreground is empty; ties go to the shape listed first
    in :data:`SHAPES`. See :func:`shape_scores` for the arguments and the search.
    """
    scores = shape_scores(img_or_mask, size_search, shift_search)
    if not scores:
        return None, 0.0
    best = max(scores, key=scores.get)  # first of equal maxima
    return best, scores[best]


def edit_success(
    src,
    edited,
    target_colour: str | None = None,
    target_shape: str | None = None,
    min_colour_fraction: float = 0.75,
    min_iou: float = 0.7,
    max_background_change: float = 0.03,
) -> dict[str, bool | float | str | None]:
    """Score an edit of `src` into `edited`: the asked-for colour and shape, the rest unchanged.

    Every edit: ``shape_ok`` (:func:`classify_shape` of the edited foreground is the expected shape: `target_shape`
    when given, else the shape classified from `src`; a circle recoloured into a square of the same area fails
    although the masks overlap with IoU > 0.8) and ``background_ok`` (:func:`background_change` <=
    `max_background_change`).

    Colour edit (`target_colour`): ``colour_ok`` (dominant palette colour of the edited foreground is the target),
    ``fraction_ok`` (>= `min_colour_fraction` of the edited foreground within RGB distance 60 of the target) and,
    unless a target shape is given, ``iou_ok`` (IoU of edited and source foreground masks >= `min_iou`).

    Shape edit (`target_shape`, optional extra): unless a target colour is given, ``colour_kept`` (dominant colour
    unchanged); the mask IoU criterion is skipped and the background is measured where both images are background.

    Args:
        src, edited: PIL images or uint8 ``H x W x 3`` arrays of the same size.
        target_colour (`str`, *optional*): one of :data:`COLOURS`.
        target_shape (`str`, *optional*): one of :data:`SHAPES`; at least one of the two targets must be given.
        min_colour_fraction (`float`, *optional*, defaults to 0.75), min_iou (`float`, *optional*, defaults to 0.7),
        max_background_change (`float`, *optional*, defaults to 0.03): the thresholds above.

    Returns:
        `dict`: the booleans above, the measured values (``dominant``, ``fraction``, ``iou``, ``background``,
        ``shape`` and ``shape_iou`` of the edited foreground, ``expected_shape``) and ``success`` (all booleans
        true).
    """
    if target_colour is None and target_shape is None:
        raise ValueError("`target_colour` or `target_shape` must be given, got neither.")
    if target_colour is not None:
        _check_colour(target_colour, "target_colour")
    if target_shape is not None:
        _check_shape(target_shape, "target_shape")
    a, b = to_array(src), to_array(edited)
    if a.shape != b.shape:
        raise ValueError(f"`src` and `edited` must have the same shape, got {a.shape} and {b.shape}.")
    fa, fb = foreground_mask(a), foreground_mask(b)
    out: dict = {"dominant": dominant_colour(b, fb), "iou": mask_iou(fa, fb)}
    checks = []
    if target_colour is not None:
        out["fraction"] = colour_fraction(b, target_colour, fb)
        out["colour_ok"] = out["dominant"] == target_colour
        out["fraction_ok"] = out["fraction"] >= min_colour_fraction
        checks += ["colour_ok", "fraction_ok"]
    if target_shape is None:
        out["iou_ok"] = out["iou"] >= min_iou
        checks.append("iou_ok")
    out["shape"], out["shape_iou"] = classify_shape(fb)
    out["expected_shape"] = target_shape if target_shape is not None else classify_shape(fa)[0]
    out["shape_ok"] = out["shape"] is not None and out["shape"] == out["expected_shape"]
    checks.append("shape_ok")
    if target_shape is None:
        out["background"] = background_change(a, b)
    else:
        if target_colour is None:
            out["colour_kept"] = out["dominant"] == dominant_colour(a, fa)
            checks.append("colour_kept")
        out["background"] = background_change(a, b, mask=~fa & ~fb)
    out["background_ok"] = out["background"] <= max_background_change
    checks.append("background_ok")
    out["success"] = bool(all(out[k] for k in checks))
    return out

"""Fast tests of the test-bed world: geometry, sampling, determinism and every measurement."""

import math

import numpy as np
import pytest

from diffusionclip_pipeline.testbed import world as w


def arr(img):
    return np.asarray(img)


def fg(img):
    return (arr(img) != 255).any(-1)


# ---------------------------------------------------------------------------------------------------- geometry
def test_circle_exact_pixels():
    m = fg(w.render_shape("circle", "red", 16, 16, 5))
    assert m[15, 15] and m[16, 20] and not m[16, 21]  # centre (20.5, 16.5): 4.5^2 + .5^2 <= 25; 5.5 > 5
    assert m[16, 11] and not m[16, 10]
    np.testing.assert_array_equal(m, m.T)
    np.testing.assert_array_equal(m, m[::-1, ::-1])
    assert abs(m.sum() - math.pi * 25) < 10


def test_square_exact_pixels():
    m = fg(w.render_shape("square", "blue", 16, 16, 5))  # half side 4: x, y in [12, 20]
    ys, xs = np.nonzero(m)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (12, 19, 12, 19)
    assert m.sum() == 64


def test_triangle_exact_pixels():
    m = fg(w.render_shape("triangle", "green", 16, 16, 8))  # apex y = 8, base y = 20
    rows = m.sum(1)
    assert rows[:9].sum() == 0  # y = 8.5: half width 0.29 < 0.5
    assert rows[9] == 2 and m[9, 15] and m[9, 16]
    assert rows[19] == 14 and m[19, 9] and m[19, 22] and not m[19, 8]
    assert rows[20:].sum() == 0
    np.testing.assert_array_equal(m, m[:, ::-1])
    assert np.all(np.diff(rows[9:20]) >= 0)


def test_fill_colour_and_white_background():
    img = arr(w.render_shape("circle", "yellow", 10, 12, 4, size=24))
    assert img.shape == (24, 24, 3) and img.dtype == np.uint8
    m = fg(img)
    assert (img[m] == w.COLOURS["yellow"]).all()
    assert (img[~m] == 255).all()
    img = arr(w.render_shape("circle", "yellow", 10, 12, 4, size=24, rgb=(1, 2, 3)))
    assert (img[fg(img)] == (1, 2, 3)).all()


def test_render_batch_matches_render_shape():
    rng = np.random.default_rng(3)
    p = w.sample_batch(rng, 40, 32)
    batch = w.render_batch(p, 32)
    for k in range(40):
        one = w.render_shape(
            w.SHAPES[p["shape_id"][k]],
            list(w.COLOURS)[p["colour_id"][k]],
            p["cx"][k],
            p["cy"][k],
            p["r"][k],
            32,
            tuple(p["rgb"][k]),
        )
        np.testing.assert_array_equal(batch[k], arr(one))


# ---------------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("size", [24, 32])
def test_sample_scene_ranges(size):
    rng = np.random.default_rng(0)
    for _ in range(300):
        img, meta = w.sample_scene(rng, size)
        a = arr(img)
        assert a.shape == (size, size, 3)
        assert 0.18 * size <= meta["r"] <= 0.34 * size
        assert np.abs(np.array(meta["rgb"]) - w.COLOURS[meta["colour"]]).max() <= 10
        m = fg(a)
        assert m.any()
        # >= 1 px margin: no foreground in the outer ring
        assert not m[0].any() and not m[-1].any() and not m[:, 0].any() and not m[:, -1].any()
        assert meta["caption"] == f"a {meta['colour']} {meta['shape']}"


def test_fixed_shape_and_colour():
    imgs, metas = w.render_dataset(20, seed=1, shape="triangle", colour="green")
    assert {m["shape"] for m in metas} == {"triangle"} and {m["colour"] for m in metas} == {"green"}


def test_seed_determinism():
    a, ma = w.render_dataset(8, seed=5)
    b, mb = w.render_dataset(8, seed=5)
    c, _ = w.render_dataset(8, seed=6)
    assert ma == mb
    assert all((arr(x) == arr(y)).all() for x, y in zip(a, b))
    assert any((arr(x) != arr(y)).any() for x, y in zip(a, c))


def test_all_classes_appear():
    _, metas = w.render_dataset(200, seed=0)
    assert {m["shape"] for m in metas} == set(w.SHAPES)
    assert {m["colour"] for m in metas} == set(w.COLOURS)


def test_caption():
    assert w.caption("red", "circle") == "a red circle"
    assert w.caption("blue", "square", "a photo of a {}") == "a photo of a blue square"
    for t in w.TEMPLATES:
        assert "green triangle" in w.caption("green", "triangle", t)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: w.render_shape("hexagon", "red", 16, 16, 5), "shape"),
        (lambda: w.render_shape("circle", "purple", 16, 16, 5), "colour"),
        (lambda: w.render_shape("circle", "red", 16, 16, 0), "r"),
        (lambda: w.render_shape("circle", "red", 16, 16, 5, size=4), "size"),
        (lambda: w.render_shape("circle", "red", 16, 16, 5, rgb=(300, 0, 0)), "rgb"),
        (lambda: w.sample_scene(np.random.default_rng(0), 32, shape="oval"), "shape"),
        (lambda: w.sample_scene(0, 32), "rng"),
        (lambda: w.render_dataset(-1, 0), "n"),
        (lambda: w.render_dataset(2, 0.5), "seed"),
        (lambda: w.caption("red", "circle", "no slot"), "template"),
        (lambda: w.foreground_mask(np.zeros((4, 4, 3), np.uint8), threshold=300), "threshold"),
        (lambda: w.foreground_mask(np.zeros((4, 4), np.uint8)), "img"),
        (lambda: w.mask_iou(np.zeros((2, 2)), np.zeros((3, 3))), "a"),
        (lambda: w.dominant_colour(np.zeros((4, 4, 3), np.uint8), mask=np.zeros((2, 2))), "mask"),
        (lambda: w.colour_fraction(np.zeros((4, 4, 3), np.uint8), "pink"), "colour"),
        (lambda: w.connected_components(np.zeros((4, 4)), connectivity=6), "connectivity"),
        (lambda: w.edit_success(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8)), "target_colour"),
        (
            lambda: w.edit_success(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8), "cyan"),
            "target_colour",
        ),
    ],
)
def test_value_errors_name_the_argument(call, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        call()


# ------------------------------------------------------------------------------------------------ measurements
def blank(size=16):
    return np.full((size, size, 3), 255, np.uint8)


def test_foreground_mask_threshold():
    img = blank(4)
    img[0, 0] = (200, 200, 200)  # 55 from white: background
    img[0, 1] = (100, 255, 255)  # 155 from white: foreground
    img[0, 2] = (255, 255, 154)  # 101: foreground
    m = w.foreground_mask(img)
    assert m.tolist()[0] == [False, True, True, False] and m.sum() == 2
    assert w.foreground_mask(img, threshold=50).sum() == 3
    assert not w.foreground_mask(blank()).any()


def test_foreground_mask_accepts_pil_and_array():
    img = w.render_shape("square", "red", 8, 8, 4, size=16)
    np.testing.assert_array_equal(w.foreground_mask(img), w.foreground_mask(arr(img)))


def test_dominant_colour_majority_vote():
    img = blank()
    img[0, :10] = (225, 45, 35)  # red-ish
    img[1, :5] = w.COLOURS["blue"]
    assert w.dominant_colour(img) == "red"
    img[2, :8] = (40, 75, 210)
    assert w.dominant_colour(img) == "blue"
    assert w.dominant_colour(blank()) is None
    only_first_row = np.zeros((16, 16), bool)
    only_first_row[0] = True
    assert w.dominant_colour(img, mask=only_first_row) == "red"


def test_colour_fraction():
    img = blank()
    img[0, :6] = w.COLOURS["green"]
    img[1, :2] = (40 + 50, 160, 60)  # distance 50 <= 60
    img[2, :2] = (40 + 70, 160, 60)  # distance 70 > 60
    assert w.colour_fraction(img, "green") == pytest.approx(8 / 10)
    assert w.colour_fraction(img, "green", radius=80) == pytest.approx(1.0)
    assert w.colour_fraction(img, "red") == 0.0
    assert w.colour_fraction(blank(), "red") == 0.0


def test_mask_iou():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True  # 8 px
    b[1:3] = True  # 8 px, 4 shared
    assert w.mask_iou(a, b) == pytest.approx(4 / 12)
    assert w.mask_iou(a, a) == 1.0
    assert w.mask_iou(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0


def test_background_change():
    src = arr(w.render_shape("square", "red", 8, 8, 4, size=16))
    assert w.background_change(src, src) == 0.0
    edited = src.copy()
    bg = ~w.foreground_mask(src)
    edited[bg] = 245
    assert w.background_change(src, edited) == pytest.approx(10 / 255)
    edited2 = src.copy()
    edited2[~bg] = w.COLOURS["blue"]  # foreground changes do not count
    assert w.background_change(src, edited2) == 0.0


def test_connected_components():
    m = np.zeros((6, 6), bool)
    m[0:2, 0:2] = True
    m[4:6, 4:6] = True
    lab, n = w.connected_components(m)
    assert n == 2 and set(np.unique(lab)) == {0, 1, 2} and (lab[0, 0], lab[5, 5]) == (1, 2)
    d = np.zeros((3, 3), bool)
    d[0, 0] = d[1, 1] = True  # diagonal neighbours
    assert w.connected_components(d)[1] == 1
    assert w.connected_components(d, connectivity=4)[1] == 2
    assert w.connected_components(np.zeros((3, 3), bool))[1] == 0
    snake = np.zeros((7, 7), bool)
    snake[0, :] = snake[:, 6] = snake[6, :] = True
    assert w.connected_components(snake)[1] == 1


def test_is_clean_shape():
    imgs, _ = w.render_dataset(60, seed=11)
    assert all(w.is_clean_shape(i) for i in imgs)
    assert not w.is_clean_shape(blank(32))
    two = arr(w.render_shape("circle", "red", 8, 8, 5)).copy()
    two[20:28, 20:28] = w.COLOURS["blue"]
    assert not w.is_clean_shape(two)
    rep = w.clean_shape_report(two)
    assert rep["n_components"] == 2 and not rep["one_blob"]
    bicolour = arr(w.render_shape("square", "red", 16, 16, 8)).copy()
    bicolour[16:] = np.where(bicolour[16:] != 255, np.array(w.COLOURS["green"], np.uint8), bicolour[16:])
    assert not w.is_clean_shape(bicolour)
    tinted = arr(w.render_shape("circle", "red", 16, 16, 6)).copy()
    tinted[~w.foreground_mask(tinted)] = (255, 215, 215)  # pink background
    assert not w.clean_shape_report(tinted)["white_background"]
    assert not w.is_clean_shape(tinted)


@pytest.mark.parametrize("size", [24, 32, 64])
@pytest.mark.parametrize("shape", w.SHAPES)
def test_classify_shape_on_rendered_images(shape, size):
    # every size and position the world samples, in every colour
    imgs, _ = w.render_dataset(60, seed=12, size=size, shape=shape)
    assert [w.classify_shape(i)[0] for i in imgs] == [shape] * 60
    # the extremes: smallest and largest r, pushed into opposite corners
    for frac in (w.R_MIN_FRAC, w.R_MAX_FRAC):
        r = frac * size
        left, right, top, bottom = w._extent(shape, r)
        for cx, cy in ((1 + left, 1 + top), (size - 1 - right, size - 1 - bottom)):
            assert w.classify_shape(w.render_shape(shape, "green", cx, cy, r, size))[0] == shape


def test_classify_shape_empty_and_scores():
    assert w.classify_shape(blank()) == (None, 0.0)
    assert w.shape_scores(blank()) == {}
    img = w.render_shape("triangle", "red", 16, 16, 9)
    scores = w.shape_scores(img)
    assert list(scores) == list(w.SHAPES)
    assert w.classify_shape(img) == ("triangle", scores["triangle"])
    assert scores["triangle"] > max(scores["circle"], scores["square"])
    assert w.shape_scores(w.foreground_mask(img)) == scores
    with pytest.raises(ValueError, match="`size_search`"):
        w.shape_scores(img, size_search=0)


@pytest.mark.parametrize("shape", w.SHAPES)
def test_classify_shape_ignores_a_stray_pixel(shape):
    # one far-away speck moves the bounding box by 10 pixels but the centroid by less than half a pixel
    img = arr(w.render_shape(shape, "blue", 20, 20, 7)).copy()
    img[2, 2] = w.COLOURS["blue"]
    assert w.classify_shape(img)[0] == shape


def same_area_radius(shape, r, other):
    """Radius of `other` with the area of `shape` at radius `r` (both centred alike: same centroid)."""
    return r * math.sqrt(w._AREA_PER_R2[shape] / w._AREA_PER_R2[other])


@pytest.mark.parametrize("source", w.SHAPES)
@pytest.mark.parametrize("edited", w.SHAPES)
def test_edit_success_colour_edit_must_keep_the_shape(source, edited):
    src = w.render_shape(source, "red", 16, 16, 8)
    out = w.render_shape(edited, "blue", 16, 16, same_area_radius(source, 8, edited))
    res = w.edit_success(src, out, target_colour="blue")
    assert res["colour_ok"] and res["fraction_ok"] and res["background_ok"]
    assert res["expected_shape"] == source and res["shape"] == edited
    assert res["shape_ok"] == res["success"] == (source == edited)


def test_edit_success_circle_recoloured_into_square_fails_despite_iou():
    # the demo's failure: a blue square where a blue circle was asked; the masks overlap with IoU 0.84 >= 0.7
    src = w.render_shape("circle", "red", 16, 16, 8)
    square = w.render_shape("square", "blue", 16, 16, same_area_radius("circle", 8, "square"))
    res = w.edit_success(src, square, target_colour="blue")
    assert res["iou_ok"] and res["colour_ok"] and res["fraction_ok"] and res["background_ok"]
    assert res["shape"] == "square" and not res["shape_ok"] and not res["success"]
    good = w.edit_success(src, w.render_shape("circle", "blue", 16, 16, 8), target_colour="blue")
    assert good["shape"] == "circle" and good["shape_ok"] and good["success"]


# Foreground masks of three edits by the demo (`diffusionclip-demo`, red -> blue circles, data seed 0, 2026-12-06):
# held-out images 2 and 7 came back as blue squares, image 0 as a blue circle. (top row, left column, rows)
DEMO_EDITS = {
    2: (11, 16, [".#########"] + ["##########"] * 9),
    7: (9, 13, ["##########....."] + ["###############"] * 8 + ["##############."] * 6 + ["##............."]),
    0: (3, 14, [
        "........#.......", ".....#######....", "...##########...", "..############..", ".##############.",
        ".###############", ".###############", "################", "################", ".###############",
        "################", "################", ".##############.", ".##############.", "..############..",
        "...##########...", "......####......",
    ]),
}  # fmt: skip


@pytest.mark.parametrize("index, shape", [(2, "square"), (7, "square"), (0, "circle")])
def test_edit_success_on_the_demos_edits(index, shape):
    sources, _ = w.render_dataset(16, seed=1, shape="circle", colour="red")  # the demo's held-out images
    top, left, rows = DEMO_EDITS[index]
    edited = blank(32)
    for i, row in enumerate(rows):
        for j, c in enumerate(row):
            if c == "#":
                edited[top + i, left + j] = w.COLOURS["blue"]
    res = w.edit_success(sources[index], edited, target_colour="blue")
    # the measure before shape-awareness accepted all three
    assert res["colour_ok"] and res["fraction_ok"] and res["iou_ok"] and res["background_ok"]
    assert w.classify_shape(edited)[0] == res["shape"] == shape
    assert res["shape_ok"] == res["success"] == (shape == "circle")


def test_edit_success_colour_edit():
    src = w.render_shape("circle", "red", 16, 16, 7)
    good = w.render_shape("circle", "blue", 16, 16, 7)
    res = w.edit_success(src, good, target_colour="blue")
    assert res["success"] and res["colour_ok"] and res["fraction_ok"] and res["iou_ok"] and res["background_ok"]
    assert res["shape_ok"] and res["shape"] == res["expected_shape"] == "circle"
    assert res["iou"] == 1.0 and res["background"] == 0.0
    assert not w.edit_success(src, src, target_colour="blue")["colour_ok"]
    moved = w.render_shape("circle", "blue", 9, 9, 6)
    res = w.edit_success(src, moved, target_colour="blue")
    assert res["colour_ok"] and not res["iou_ok"] and not res["success"]
    half = arr(good).copy()
    m = w.foreground_mask(half)
    half[:16][m[:16]] = w.COLOURS["red"]  # top half still red: 'fraction' fails (< 75 %)
    assert not w.edit_success(src, half, target_colour="blue")["fraction_ok"]
    dirty = arr(good).copy()
    dirty[~m] = 240
    res = w.edit_success(src, dirty, target_colour="blue")
    assert res["colour_ok"] and res["iou_ok"] and not res["background_ok"] and not res["success"]
    tinted = arr(good).copy()
    tinted[~m] = (255, 235, 235)  # a pink tint, far below the foreground threshold: 20 / 255 / 3 per pixel
    res = w.edit_success(src, tinted, target_colour="blue")
    assert res["colour_ok"] and res["fraction_ok"] and res["iou_ok"] and res["shape_ok"]
    assert res["background"] == pytest.approx(40 / 3 / 255) and not res["background_ok"] and not res["success"]


def test_edit_success_shape_edit():
    src = w.render_shape("circle", "red", 16, 16, 7)
    res = w.edit_success(src, w.render_shape("square", "red", 16, 16, 7), target_shape="square")
    assert res["shape_ok"] and res["colour_kept"] and res["background_ok"] and res["success"]
    assert res["expected_shape"] == res["shape"] == "square" and "iou_ok" not in res
    res = w.edit_success(src, src, target_shape="square")
    assert res["shape"] == "circle" and not res["shape_ok"] and not res["success"]
    res = w.edit_success(src, w.render_shape("triangle", "red", 16, 16, 8), target_shape="square")
    assert res["shape"] == "triangle" and not res["shape_ok"] and not res["success"]
    both = w.edit_success(src, w.render_shape("square", "blue", 16, 16, 7), "blue", "square")
    assert both["colour_ok"] and both["shape_ok"] and "colour_kept" not in both and both["success"]

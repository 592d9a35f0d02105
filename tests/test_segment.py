"""service.segment: illumination removal, line removal, components and glyphs, on real MNIST digits and pages."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
from mnist_fixture import mnist_test
from PIL import Image

from service.imaging import segment


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    data = mnist_test()
    if data is None:
        pytest.fail("MNIST test files not found; run `make data`")
    return data[0][:12]


def flood_fill(mask: np.ndarray) -> np.ndarray:
    """The 8-connected component of each pixel (-1 off the mask), numbered in the order a row-major scan meets
    them, the slow obvious way: the numbering `segment._label` promises (a component's first pixel starts its
    first run)."""
    labels = np.full(mask.shape, -1)
    count = 0
    for start in zip(*np.nonzero(mask), strict=True):
        if labels[start] >= 0:
            continue
        labels[start] = count
        queue = deque([start])
        while queue:
            y, x = queue.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < mask.shape[0] and 0 <= xx < mask.shape[1] and mask[yy, xx] and labels[yy, xx] < 0:
                        labels[yy, xx] = count
                        queue.append((yy, xx))
        count += 1
    return labels


def assert_labels_match_flood_fill(mask: np.ndarray) -> None:
    runs = segment._runs(mask)
    labels, count = segment._label(runs, mask.shape[1])
    expected = flood_fill(mask)
    rows, starts, stops = runs
    assert count == expected.max() + 1
    # Each run's label is the flood fill's at every pixel of the run: same components, same numbering.
    assert np.array_equal(labels, expected[rows, starts]) and np.array_equal(labels, expected[rows, stops - 1])


def speckle_masks() -> list[np.ndarray]:
    """Seeded masks for the labelling: random ones of every density the ink mask shows (1-60%), speckle (the
    most runs per pixel), checkerboards (joined only diagonally), lines, full and empty, 1xN and Nx1."""
    rng = np.random.default_rng(0)
    masks = []
    for _ in range(300):
        shape = (int(rng.integers(1, 25)), int(rng.integers(1, 41)))
        masks.append(rng.random(shape) < rng.uniform(0.01, 0.6))
    yy, xx = np.mgrid[0:23, 0:37]
    patterns = [
        xx % 2 == 1,  # what the worst-case speckle upload leaves: a 1-pixel run on every other column
        (xx % 2 == 1) & (rng.random(xx.shape) < 0.9),  # ... broken here and there
        (yy + xx) % 2 == 0,  # a checkerboard: one piece, through its corners only
        ((yy + xx) % 2 == 0) & (rng.random(xx.shape) < 0.8),
        (yy % 2 == 0) & (xx % 2 == 0),  # single pixels two apart: every one its own piece
        (xx - yy) % 5 == 0,  # diagonal lines, and the other way
        (xx + yy) % 7 == 0,
        np.ones(xx.shape, bool),
        np.zeros(xx.shape, bool),
    ]
    for pattern in patterns:
        masks += [pattern, pattern[:1], pattern[:, :1], pattern[::-1]]
    return masks


def test_run_length_labelling_matches_flood_fill() -> None:
    for mask in speckle_masks():
        assert_labels_match_flood_fill(mask)


@pytest.mark.parametrize("density", [0.3, 0.5, 0.6])
def test_run_length_labelling_matches_flood_fill_on_a_page(density: float) -> None:
    assert_labels_match_flood_fill(np.random.default_rng(int(density * 10)).random((60, 80)) < density)


def test_labelling_is_8_connected() -> None:
    def count(rows: list[list[int]]) -> int:
        mask = np.array(rows, bool)
        return segment._label(segment._runs(mask), mask.shape[1])[1]

    assert count([[1, 0], [0, 1]]) == count([[0, 1], [1, 0]]) == 1  # corners touch
    assert count([[1, 0, 1]]) == count([[1], [0], [1]]) == count([[1, 0], [0, 0], [0, 1]]) == 2


def test_labelling_the_worst_case_speckle() -> None:
    # The most runs a mask on the analysis copy can hold (512 x 512): a 1-pixel run on every other column of every
    # row, as the crafted speckle upload of docs/preprocessing.md leaves. Each column is one piece, numbered left
    # to right (the first row meets them in that order).
    mask = np.zeros((512, 512), bool)
    mask[:, 1::2] = True
    mask[100:140, 201:260] = True  # a digit's bar across 30 of them (columns 201..259), joining them
    runs = segment._runs(mask)
    labels, count = segment._label(runs, mask.shape[1])
    _, starts, _ = runs
    joined = (starts >= 201) & (starts < 260)
    expected = np.where(joined, 100, np.where(starts < 201, starts // 2, starts // 2 - 29))
    assert count == 256 - 29
    assert np.array_equal(labels, expected)


def test_min_and_max_filters_match_a_brute_force_window() -> None:
    values = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    for window in (1, 3, 5, 9, 25):
        padded = np.pad(values, window // 2, mode="edge")
        stack = [padded[i : i + 40, j : j + 50] for i in range(window) for j in range(window)]
        assert np.array_equal(segment.min_filter(values, window), np.min(stack, axis=0))
        assert np.array_equal(segment.max_filter(values, window), np.max(stack, axis=0))


def test_flatten_removes_a_shadow_and_keeps_the_ink(digits: np.ndarray) -> None:
    # Ink-bright page: MNIST digit on a sheet whose top-left corner is in a shadow 50% darker (0.5 in ink-bright),
    # cast from outside the frame, with a penumbra of 10 px.
    big = np.asarray(Image.fromarray(digits[0]).resize((120, 120)), np.float32) / 255
    yy, xx = np.mgrid[0:300, 0:400]
    light = (1.0 - 0.5 * np.clip((200 - np.hypot(yy, xx)) / 10 + 0.5, 0, 1)).astype(np.float32)
    reflectance = np.ones((300, 400), np.float32)
    reflectance[150:270, 250:370] = 1 - 0.9 * big
    reflectance[20:140, 20:140] = 1 - 0.9 * big  # the same digit inside the shadow
    ink = segment.flatten(1 - light * reflectance)
    paper = np.ones((300, 400), bool)
    paper[10:150, 10:150] = paper[140:280, 240:380] = False
    assert np.percentile(ink[paper], 99) < 0.1
    # The digit has the same strength in the shadow as in the light.
    lit, shaded = ink[150:270, 250:370].max(), ink[20:140, 20:140].max()
    assert lit > 0.8 and abs(lit - shaded) < 0.1


def test_glyphs_are_found_left_to_right_and_specks_dropped(digits: np.ndarray) -> None:
    page = np.zeros((120, 400), np.float32)
    for i, digit in enumerate(digits[:3]):
        page[10:110, 20 + 130 * i : 120 + 130 * i] = np.asarray(Image.fromarray(digit).resize((100, 100))) / 255
    page[2:4, 390:392] = 1.0  # a speck
    found = segment.glyphs(page, page > 0.3)
    assert [g.left // 130 for g in found] == [0, 1, 2]
    assert all(40 <= g.height <= 100 for g in found)
    assert segment.side_by_side(segment.digit_sized(found, page.shape))


def test_a_hat_joins_its_digit() -> None:
    mask = np.zeros((200, 200), bool)
    mask[60:180, 50:60] = True  # a stroke
    mask[40:50, 50:120] = True  # its hat, 10 px above
    (glyph,) = segment.glyphs(mask.astype(np.float32), mask)
    assert (glyph.top, glyph.left, glyph.height, glyph.width) == (40, 50, 140, 70)


def test_ruled_lines_are_removed_where_no_stroke_crosses_them() -> None:
    mask = np.zeros((300, 400), bool)
    mask[50::60, :] = True  # ruled lines every 60 px
    mask[20:200, 200:208] = True  # a stroke crossing three of them
    lines = segment.remove_lines(mask)
    assert lines[50, :150].all() and lines[110, 250:].all()
    assert not lines[50, 200:208].any() and not lines[110, 200:208].any()
    assert not lines[20:200, 200:208].any()


def test_squared_paper_crossings_inside_a_stroke_stay_and_bare_ones_go() -> None:
    mask = np.zeros((300, 400), bool)
    mask[20::40, :] = mask[21::40, :] = mask[22::40, :] = True  # squared paper, 3 px lines every 40 px
    mask[:, 20::40] = mask[:, 21::40] = mask[:, 22::40] = True
    mask[90:180, 90:200] = True  # a bold stroke over four crossings, e.g. (100, 100)
    lines = segment.remove_lines(mask)
    assert not lines[90:180, 90:200].any()  # before: the crossings inside it were cut out (holes in the digit)
    assert lines[20:23, 20:23].all() and lines[260:263, 340:343].all()  # crossings on bare paper go
    assert lines[60:63, :80].all() and lines[:80, 300:303].all()


def test_a_stroke_along_a_line_is_not_cut_where_it_crosses_another() -> None:
    mask = np.zeros((300, 400), bool)
    mask[50::60, :] = mask[51::60, :] = mask[52::60, :] = True  # ruled lines, 3 px
    mask[:, 120:123] = True  # a margin line, 3 px
    mask[100:200, 119:125] = True  # a fine 1 written on the margin line, down across the ruled line at 110
    lines = segment.remove_lines(mask)
    assert not lines[100:200, 119:125].any()  # before: cut at the crossing (a 1 in two pieces)
    assert lines[110:113, :110].all() and lines[110:113, 135:].all()
    assert lines[:90, 120:123].all() and lines[210:, 120:123].all()


def test_a_long_stroke_that_does_not_cross_the_page_is_no_line() -> None:
    mask = np.zeros((300, 400), bool)
    mask[30:270, 195:203] = True  # a tall 1 on a canvas, not touching the edges
    assert not segment.remove_lines(mask).any()


def touching_pair(digits: np.ndarray) -> np.ndarray:
    """MNIST test digits 0 and 1 (a 7 and a 2) drawn 100 px tall, their boxes overlapping, joined by a stroke."""
    a, b = (np.asarray(Image.fromarray(d).resize((100, 100))) / 255 for d in digits[:2])
    page = np.zeros((120, 200), np.float32)
    page[10:110, 10:110] = a
    page[10:110, 85:185] = np.maximum(page[10:110, 85:185], b)  # overlapping boxes
    page[60:64, 60:110] = 1.0  # and a stroke that joins them: the ink touches
    return page


def test_touching_digits_are_split_where_the_ink_is_thinnest(digits: np.ndarray) -> None:
    page = touching_pair(digits)
    rows = segment.reading_order(segment.glyphs(page, page > 0.3))
    assert len(rows) == 1 and len(rows[0]) == 1
    (glyph,) = rows[0]
    assert segment.too_wide(glyph, rows[0])
    cuts = segment.touching_cuts(glyph, rows[0])
    assert cuts and all(len(parts) == 2 and parts[0].right <= parts[1].left + 2 for parts in cuts)
    # The first cut is the even split's thinnest column: within the overlap of the two boxes (75..110).
    assert 70 <= cuts[0][0].right <= 115, cuts[0][0].right
    # A single digit is not too wide; a narrow one (MNIST test digit 2, a 1) has no cut to try, while this 7, wider
    # than TOUCHING_WIDTH of its height, has one (the model decides, preprocess.choose).
    single = segment.glyphs(page[:, :80], page[:, :80] > 0.3)
    assert not segment.too_wide(single[0], single) and not segment.too_wide(single[0], single, segment.SEVERAL_WIDTH)
    assert single[0].width > segment.TOUCHING_WIDTH * single[0].height and segment.touching_cuts(single[0], single)
    one = np.zeros((120, 120), np.float32)
    one[10:110, 10:110] = np.asarray(Image.fromarray(digits[2]).resize((100, 100))) / 255
    narrow = segment.glyphs(one, one > 0.3)
    assert len(narrow) == 1 and not segment.touching_cuts(narrow[0], narrow)


def test_touching_digits_are_also_cut_straight_down_across_their_middle(digits: np.ndarray) -> None:
    page = touching_pair(digits)
    rows = segment.reading_order(segment.glyphs(page, page > 0.3))
    (glyph,) = rows[0]
    suggested = segment.touching_cuts(glyph, rows[0])
    searched = segment.searched_cuts(glyph, rows[0], suggested)
    # About one cut per SEARCH_STEP of the middle, none of them one already suggested, ...
    middle = (1 - 2 * segment.PAIR_MARGIN) / segment.SEARCH_STEP
    assert middle - 2 <= len(searched) <= middle + 2
    assert not {segment._key(parts) for parts in searched} & {segment._key(parts) for parts in suggested}
    # ... each straight down: the left part ends where the right begins, both in the glyph's middle.
    low, high = glyph.left + segment.PAIR_MARGIN * glyph.width - 1, glyph.right - segment.PAIR_MARGIN * glyph.width
    assert all(len(parts) == 2 and parts[0].right <= parts[1].left for parts in searched)
    assert all(low <= parts[0].right and parts[1].left <= high + 1 for parts in searched)
    assert len({parts[1].left for parts in searched}) == len(searched)
    # The 7 alone, wider than TOUCHING_WIDTH (it gets the suggested cuts) but narrower than SHAPED_CUTS_WIDTH of its
    # height, is not searched.
    single = segment.glyphs(page[:, :80], page[:, :80] > 0.3)
    assert segment.TOUCHING_WIDTH * single[0].height < single[0].width <= segment.SHAPED_CUTS_WIDTH * single[0].height
    assert segment.searched_cuts(single[0], single, []) == []


def test_reading_order_puts_rows_top_to_bottom(digits: np.ndarray) -> None:
    page = np.zeros((260, 300), np.float32)
    for i, (row, col) in enumerate([(10, 150), (10, 20), (140, 90)]):
        page[row : row + 100, col : col + 100] = np.asarray(Image.fromarray(digits[i]).resize((100, 100))) / 255
    rows = segment.reading_order(segment.glyphs(page, page > 0.3))
    assert [len(row) for row in rows] == [2, 1]
    assert rows[0][0].left < rows[0][1].left and rows[1][0].top > rows[0][0].bottom


def test_digits_touching_at_a_slant_are_cut_along_a_path_not_a_column(digits: np.ndarray) -> None:
    def slanted(digit: np.ndarray) -> np.ndarray:
        # 100x100, sheared so its top leans 40 px right: like fast handwriting.
        image = Image.fromarray(digit).resize((100, 100))
        image = image.transform((140, 100), Image.Transform.AFFINE, (1, 0.4, -40, 0, 1, 0), Image.Resampling.BILINEAR)
        return np.asarray(image, np.float32) / 255

    a, b = slanted(digits[0]), slanted(digits[1])
    page = np.zeros((120, 220), np.float32)
    page[10:110, 10:150] = a
    page[10:110, 55:195] = np.maximum(page[10:110, 55:195], b)  # a slanted 7 (digits[0]) leaning over the 2 beside it
    own_a, own_b = np.zeros(page.shape, bool), np.zeros(page.shape, bool)
    own_a[10:110, 10:150], own_b[10:110, 55:195] = a > 0.3, b > 0.3
    assert not (own_a & own_b).any()  # they do not overlap, ...
    mask = page > 0.3
    mask[58:62, 60:135] = True  # ... but a stroke joins them
    rows = segment.reading_order(segment.glyphs(page, mask))
    (glyph,) = rows[0]

    def right(parts: list[segment.Glyph]) -> bool:
        """Each part holds at least 95% of one digit's ink, in order."""
        if len(parts) != 2:
            return False
        held = []
        for part, own in zip(parts, (own_a, own_b), strict=True):
            box = np.zeros(page.shape, bool)
            box[part.top : part.bottom, part.left : part.right] = part.mask
            held.append((box & own).sum() / own.sum())
        return min(held) >= 0.95

    # No straight cut does it (the digits' boxes overlap by more than their slant leaves free) ...
    columns = [
        [segment._trimmed(glyph, 0, c), segment._trimmed(glyph, c, glyph.width)] for c in range(1, glyph.width - 1)
    ]
    assert not any(right(parts) for parts in columns)
    # ... but one of the cuts offered to the model does.
    assert any(right(parts) for parts in segment.touching_cuts(glyph, rows[0]))

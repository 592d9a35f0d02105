"""Finding the digits on a page: the paper's light removed, lines dropped, ink split into digit-sized glyphs.

Pure numpy (and Pillow for resizing), shared by `/predict` (one digit: refuse a page with several) and `/read`
(every digit, left to right). Works on the analysis copy of an upload (longer side <= WORK_SIDE), in
"ink-bright" polarity: the caller has inverted dark-ink-on-light-paper images, so ink is high and paper low.

1. **Illumination.** The paper's level is estimated at low resolution by a grey-level opening (a minimum filter
   then a maximum filter, each wider than any pen stroke, so strokes vanish and shadows, vignettes and gradients
   stay), then interpolated back up. Ink is what rises above it, divided by the light that falls there: a digit in
   a shadow 60% darker has the same strength as one in full light, and the shadow itself is no ink.
2. **Lines.** Long straight runs of ink that touch the page's edge (ruled and squared paper, margin lines, a
   page's edge) are removed, except where a digit's stroke crosses them.
3. **Components.** The ink mask is split into 8-connected components (run-length labelling, vectorised);
   specks and long thin shapes that reach the page's edge are dropped; the rest are grouped into glyphs (a 5's
   hat, a 7's bar and a broken stroke join their digit) and sorted left to right.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image

# The paper's light is estimated on a copy whose longer side is BG_SIDE, with an opening of BG_WINDOW pixels
# there (a fifth of the page): wider than any pen stroke on a page that holds the digit with a margin, and fine
# enough that a shadow's edge is followed to within a few pixels of the analysis copy.
BG_SIDE = 128
BG_WINDOW = 25
# Reconstruction from the page's edges runs on RECONSTRUCT_POOL x RECONSTRUCT_POOL max-pooled cells and advances
# RECONSTRUCT_STEP cells per step.
RECONSTRUCT_POOL = 4
RECONSTRUCT_STEP = 2
# Below this size an image is a digit tile, not a photo: its paper is taken as flat.
FLAT_BELOW = 64
# Light below this fraction of the brightest paper is too dark to divide by (noise would explode).
MIN_LIGHT = 0.15

# A row (column) with ink along at least this fraction of the page, reaching its edge, holds a line.
LINE_FRACTION = 0.5
# ... and is at most this thick, relative to the page's width (ruled lines are a few pixels, digits' bars more).
LINE_THICKNESS = 1 / 30
# Lines are found with ~0.5 degree of tilt tolerated: the mask is widened across them by 1/TILT_PIXELS of the side.
TILT_PIXELS = 250

# Components smaller than this fraction of the largest one are specks.
SPECK_FRACTION = 0.02
# A component touching the page's edge, spanning this fraction of the page, and thin (its area over its length
# below THIN_RATIO of its length) is a line or a shadow's edge, not a digit.
EDGE_SPAN = 0.4
THIN_RATIO = 0.05
# At most this many pieces are grouped (the biggest): a page of writing has far fewer, noise far more.
MAX_PIECES = 48
# Pieces join one glyph when they overlap horizontally and are at most this far apart vertically, or overlap
# vertically and are at most JOIN_ACROSS apart horizontally (both in units of the ink's height).
JOIN_DOWN = 0.25
JOIN_ACROSS = 0.08
JOIN_NEAR = 0.05
# A digit spans at least this fraction of the page's longer side (smaller marks are dots and dirt).
DIGIT_MIN_SIDE = 0.04
# A glyph is digit-sized when it is at least this tall and heavy (ink), relative to the tallest and heaviest
# (a 1 has about a third of a 0's ink).
DIGIT_HEIGHT = 0.5
DIGIT_MASS = 0.1

# A glyph wider than TOUCHING_WIDTH times its row's usual height may be digits that touch (or a round 0: the
# model decides; 0.55 rather than 0.7 also tries narrow pairs, a 1 touching a 7, measured on `make bench-read`'s
# seed-1 pages, docs/preprocessing.md); each is about DIGIT_WIDTH wide, and the cut between two is looked for
# within CUT_SEARCH of a digit's width around the even split.
TOUCHING_WIDTH = 0.55
# ... one wider than TOUCHING_SURE times it is more likely touching digits than one, and one wider than
# SEVERAL_WIDTH times it is never read as one digit when it can be cut (see preprocess.choose): on `make
# bench-read`'s pages (three seeds) that took only touching pairs the model had read whole.
TOUCHING_SURE = 1.15
SEVERAL_WIDTH = 1.5
# Two touching digits are also tried cut at the PAIR_CUTS thinnest columns between PAIR_MARGIN and 1 - PAIR_MARGIN.
PAIR_CUTS = 3
PAIR_MARGIN = 0.15
DIGIT_WIDTH = 0.7
CUT_SEARCH = 0.3
# ... and cut straight down at every SEARCH_STEP of its width between PAIR_MARGIN and 1 - PAIR_MARGIN (a search:
# where slanted strokes meet, the thinnest column is often not where one digit ends; on `make bench-read`'s
# touching pages some straight cut read both digits right on 29 of the 33 pages read wrong, seed 0). A tenth: a
# twentieth read 0-1.5 more touching pages in 100 for 1.7 times the candidates; cuts along paths from every step
# read more single digits as two (seeds 0 and 1, docs/preprocessing.md).
SEARCH_STEP = 1 / 10
# A path cut between touching digits pays this (in pixels of ink) per step sideways: it bends only to save ink.
SLANT_COST = 0.1
# Those cuts (the splits between pieces, and the search) are tried only on glyphs wider than this times the row's
# height: each is rendered and classified, and most single digits are narrower (MNIST's median width is 0.8 of the
# height). For the search, 0.55 read one touching page more in 200 on two seeds of three, for 1.7 times the candidates.
SHAPED_CUTS_WIDTH = 0.85
# Two glyphs on one line make a number (refused by /predict) only when the smaller one's larger side is at least
# this fraction of the other's: the digits of one number are written at one size (MNIST's shortest, a flat 2 or
# 5, still span 0.75 of their neighbour on the benchmark's pages), while a tick, a dash or a stray pen stroke
# beside a digit is smaller (0.6-0.7 of it).
SAME_SIZE = 0.7


@dataclass(frozen=True)
class Glyph:
    """One digit candidate: a group of components, in the analysis copy's pixel coordinates."""

    top: int
    left: int
    height: int
    width: int
    mask: np.ndarray  # bool (height, width): the glyph's own pixels (other ink in its box excluded)
    mass: float  # total ink

    @property
    def bottom(self) -> int:
        return self.top + self.height

    @property
    def right(self) -> int:
        return self.left + self.width


def flatten(gray: np.ndarray) -> np.ndarray:
    """Ink-bright gray (H, W) in [0, 1] -> ink strength in [0, 1] with the paper's uneven light removed."""
    height, width = gray.shape
    if max(height, width) < FLAT_BELOW:
        paper = float(np.median(border(gray)))
        return np.clip((gray - paper) / max(1.0 - paper, MIN_LIGHT), 0.0, 1.0)
    scale = BG_SIDE / max(height, width)
    small_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(gray, mode="F").resize(small_size, Image.Resampling.BOX))
    window = min(BG_WINDOW, 2 * (min(small.shape) // 2) - 1) if min(small.shape) > 2 else 1
    # The page is continued past its edges by odd reflection (a ramp goes on as a ramp, a shadow's plateau as a
    # plateau), so light rising towards an edge or a corner is not cut off by the opening and left as "ink".
    paper_small = _rank_filter(_rank_filter(small, window, np.minimum, "reflect"), window, np.maximum, "reflect")
    paper_small = np.minimum(paper_small, _reached_from_edges(paper_small))
    # Across a shadow's sharp edge the coarse estimate is off by up to the step it makes there: only ink above
    # that uncertainty (the estimate's local range) counts, so the edge of a shadow leaves no line of "ink".
    spread = max_filter(paper_small, 3) - min_filter(paper_small, 3)
    # One full-size interpolation (of paper + doubt, not of each): ~0.8 ms each on a 400 px page.
    level_small = paper_small + spread
    level = np.asarray(Image.fromarray(level_small, mode="F").resize((width, height), Image.Resampling.BILINEAR))
    # Ink-bright space: paper p = 1 - light (a dark-ink page inverted) or the dark paper itself; ink that absorbs
    # a fraction r of the light shows as p + r * (1 - p), so dividing by (1 - p) gives r wherever the page lies
    # (dividing by 1 - (p + doubt) instead differs only across a shadow's edge, where the doubt is large).
    light = np.maximum(1.0 - level, MIN_LIGHT)
    return np.clip((gray - level) / light, 0.0, 1.0)


def _reached_from_edges(paper: np.ndarray) -> np.ndarray:
    """An upper bound on the paper's level: each pixel's value capped by its best path to the page's edge.

    Morphological reconstruction (by dilation, from the border): light that changes towards an edge (a shadow
    cast from outside the frame, a vignette) reaches it and stays; a bright island inside the page, which is a
    digit too bold for the opening to erase, sinks to the level of the paper around it. Run at a quarter of the
    resolution (a few steps instead of dozens), with max-pooling so that the bound stays above the finer estimate
    wherever the two agree.
    """
    height, width = paper.shape
    k = RECONSTRUCT_POOL
    pooled = paper[: height - height % k, : width - width % k].reshape(height // k, k, width // k, k).max(axis=(1, 3))
    if min(pooled.shape) < 3:
        return paper
    level = np.full_like(pooled, pooled.min())
    for edge in (np.s_[0, :], np.s_[-1, :], np.s_[:, 0], np.s_[:, -1]):
        level[edge] = pooled[edge]
    for _ in range(max(pooled.shape)):
        grown = np.minimum(max_filter(level, 2 * RECONSTRUCT_STEP + 1), pooled)
        if np.array_equal(grown, level):
            break
        level = grown
    bound = np.repeat(np.repeat(level, k, axis=0), k, axis=1)
    return np.pad(bound, ((0, height - bound.shape[0]), (0, width - bound.shape[1])), mode="edge")


def remove_lines(mask: np.ndarray) -> np.ndarray:
    """The pixels of `mask` that belong to long straight lines reaching the page's edge (bool, same shape),
    less those where a digit's stroke crosses or runs along a line."""
    horizontal = _line_rows(mask)
    vertical = _line_rows(mask.T).T
    if not (horizontal.any() or vertical.any()):
        return horizontal
    # Across a horizontal line the ink is as thick as the line, except where a stroke crosses it or lies along it:
    # there it is thicker, and it stays. (Measured without the other direction's lines, so that the crossings
    # of squared paper's own lines go too.)
    across, thick_h = _thicker_than_lines(mask & ~vertical, horizontal)
    down, thick_v = _thicker_than_lines((mask & ~horizontal).T, vertical.T)
    lines = (horizontal & ~across) | (vertical & ~down.T)
    # A stroke no thicker than the lines (a fine 1 across a ruled line), or two lines crossing inside a bold
    # stroke (each test above saw the stroke cut by the other line), would leave a gap in the digit: line
    # pixels with kept ink on both sides across the line, within about a line's thickness (and the tilt
    # tolerated), belong to the stroke. A loop or a gap in a digit is wider than that and stays open.
    kept = mask & ~lines
    # (The pixels taken for a line span its band and the tilt tolerated on each side, and one more.)
    reach = round(max(thick_h, thick_v)) + 2 * max(1, max(mask.shape) // TILT_PIXELS) + 4
    both_v = _spread(kept, reach, 0, True) & _spread(kept, reach, 0, False)
    both_h = _spread(kept, reach, 1, True) & _spread(kept, reach, 1, False)
    bridged = (horizontal & both_v) | (vertical & both_h)
    return lines & ~bridged


def _thicker_than_lines(mask: np.ndarray, lines: np.ndarray) -> tuple[np.ndarray, float]:
    """Where the vertical extent of the ink (its run down the column) is well above that of the lines' pixels,
    and the lines' typical extent (their thickness)."""
    _, starts, stops = _runs(mask.T)
    lengths = stops - starts
    extent = np.zeros(mask.T.shape, np.int32)
    extent[mask.T] = np.repeat(lengths, lengths)  # runs come in the same order as the set pixels
    extent = extent.T
    on_lines = extent[lines & mask]
    if on_lines.size == 0:
        return np.zeros_like(mask), 0.0
    typical = float(np.median(on_lines))
    return extent > 1.5 * typical + 1, typical


def glyphs(ink: np.ndarray, mask: np.ndarray) -> list[Glyph]:
    """The digit candidates in `mask` (specks and edge lines dropped), sorted left to right."""
    runs = _runs(mask)
    labels, count = _label(runs, mask.shape[1])
    if count == 0:
        return []
    rows, starts, stops = runs
    lengths = (stops - starts).astype(np.float64)
    area = np.bincount(labels, weights=lengths, minlength=count)
    top = _reduce(np.minimum, labels, rows, count, mask.shape[0])
    bottom = _reduce(np.maximum, labels, rows + 1, count, 0)
    left = _reduce(np.minimum, labels, starts, count, mask.shape[1])
    right = _reduce(np.maximum, labels, stops, count, 0)

    page_h, page_w = mask.shape
    keep = area >= SPECK_FRACTION * area.max()
    h, w = bottom - top, right - left
    touches = (top == 0) | (left == 0) | (bottom >= page_h) | (right >= page_w)
    length = np.maximum(h, w)
    spans = (h >= EDGE_SPAN * page_h) | (w >= EDGE_SPAN * page_w)
    thin = area < THIN_RATIO * length.astype(np.float64) ** 2
    keep &= ~(touches & spans & thin)
    if not keep.any():
        return []
    if np.count_nonzero(keep) > MAX_PIECES:  # noise, not writing: bound the grouping's cost
        keep &= area >= np.sort(area[keep])[-MAX_PIECES]

    # Group pieces into glyphs, line of text by line, in units of the line's height (a digit's, even for a faint
    # digit in pieces, which still spans its line whole): groups merge while their boxes overlap horizontally and
    # are close vertically (a 5's hat), overlap vertically and are close horizontally (a broken bar), or are close
    # at a corner (the dashes of a dotted diagonal stroke).
    kept = np.flatnonzero(keep)
    line = _lines_of_text(top[kept], bottom[kept])
    boxes = [[int(top[c]), int(left[c]), int(bottom[c]), int(right[c]), [int(c)], line[i]] for i, c in enumerate(kept)]
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(len(boxes) - 1, i, -1):
                a, b = boxes[i], boxes[j]
                if a[5] != b[5]:
                    continue
                scale = a[5][1] - a[5][0]
                x_gap = max(a[1], b[1]) - min(a[3], b[3])
                y_gap = max(a[0], b[0]) - min(a[2], b[2])
                if (
                    (x_gap < 0 and y_gap <= JOIN_DOWN * scale)
                    or (y_gap < 0 and x_gap <= JOIN_ACROSS * scale)
                    or max(x_gap, y_gap) <= JOIN_NEAR * scale
                ):
                    a[:4] = min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])
                    a[4] += b[4]
                    del boxes[j]
                    merged = True
    members = {i: box[4] for i, box in enumerate(boxes)}

    out = []
    for parts in members.values():
        t, b = int(top[parts].min()), int(bottom[parts].max())
        lft, rgt = int(left[parts].min()), int(right[parts].max())
        own = _paint(runs, np.isin(labels, parts), (t, lft, b - t, rgt - lft))
        out.append(Glyph(t, lft, b - t, rgt - lft, own, float(ink[t:b, lft:rgt][own].sum())))
    return sorted(out, key=lambda g: g.left)


def digit_sized(found: list[Glyph], page: tuple[int, int]) -> list[Glyph]:
    """The glyphs big enough to be digits of the page's handwriting (tall and inked enough) on a page of
    shape `page`."""
    smallest = DIGIT_MIN_SIDE * max(page)
    found = [g for g in found if max(g.height, g.width) >= smallest]
    if not found:
        return []
    # Ink first, then height among what is left: a faint line's fragment can be taller than the digit, but
    # it is far lighter, and it must not make the digit look too short to count.
    heaviest = max(g.mass for g in found)
    found = [g for g in found if g.mass >= DIGIT_MASS * heaviest]
    tallest = max(g.height for g in found)
    return [g for g in found if g.height >= DIGIT_HEIGHT * tallest]


def _lines_of_text(tops: np.ndarray, bottoms: np.ndarray) -> list[tuple[int, int]]:
    """The line of text (top, bottom) of each piece: vertical spans merged where they overlap or the gap between
    them is at most JOIN_DOWN of the taller (a 5's hat joins its line; the next line down starts a new one)."""
    order = np.argsort(tops)
    spans: list[list[int]] = []
    owner = np.empty(len(tops), np.int64)
    for i in order:
        t, b = int(tops[i]), int(bottoms[i])
        if spans and t - spans[-1][1] <= JOIN_DOWN * max(b - t, spans[-1][1] - spans[-1][0]):
            spans[-1][1] = max(spans[-1][1], b)
        else:
            spans.append([t, b])
        owner[i] = len(spans) - 1
    return [(spans[k][0], spans[k][1]) for k in owner]


def too_wide(glyph: Glyph, row: list[Glyph], times: float = TOUCHING_SURE) -> bool:
    """Wider than `times` the row's height (or its own): by default wider than one digit usually is on this row,
    more likely digits that touch than one digit."""
    return glyph.width > times * _row_height(glyph, row)


def touching_cuts(glyph: Glyph, row: list[Glyph]) -> list[list[Glyph]]:
    """Ways the glyph could be digits that touch ([] when it is too narrow to be two), each a list of parts.

    As many digits as its width holds at DIGIT_WIDTH of the row's usual height, each cut at the column of least
    ink near where an even split would put it; and for two, also the cuts at the next-thinnest columns anywhere in
    its middle (a 1 touching a 6 is cut near its edge, not its middle); between its pieces, where it is several
    (digits that overlap without touching); and along the path of least ink near each cut (digits that touch at a
    slant, where no straight column parts them). Whether any is right is the model's call.
    """
    height = _row_height(glyph, row)
    if glyph.width <= TOUCHING_WIDTH * height:
        return []
    count = max(2, round(glyph.width / (DIGIT_WIDTH * height)))
    column_ink = glyph.mask.sum(axis=0)
    step = glyph.width / count
    cuts = [0]
    for k in range(1, count):
        lo, hi = round(k * step - CUT_SEARCH * step), round(k * step + CUT_SEARCH * step)
        lo, hi = max(lo, cuts[-1] + 1), min(hi, glyph.width - 1)
        cuts.append(lo + int(np.argmin(column_ink[lo:hi])) if hi > lo else round(k * step))
    alternatives = [[*cuts, glyph.width]]
    lo, hi = round(PAIR_MARGIN * glyph.width), round((1 - PAIR_MARGIN) * glyph.width)
    if hi - lo >= 3:
        middle = column_ink[lo:hi].astype(np.float64)
        # Local minima of the ink across the middle, thinnest first.
        minima = [i for i in range(1, len(middle) - 1) if middle[i] <= middle[i - 1] and middle[i] <= middle[i + 1]]
        for i in sorted(minima, key=lambda i: middle[i])[:PAIR_CUTS]:
            if count > 2 or abs(lo + i - cuts[1]) > 2:
                alternatives.append([0, lo + i, glyph.width])
    out = []
    for alternative in alternatives:
        parts = [_trimmed(glyph, a, b) for a, b in itertools.pairwise(alternative)]
        parts = [part for part in parts if part is not None]
        if len(parts) >= 2:
            out.append(parts)
    if glyph.width <= SHAPED_CUTS_WIDTH * height:
        return out
    # Digits that overlap without touching are separate pieces: split between them, whatever their boxes do.
    out += _piece_splits(glyph, height)
    # Digits that touch at a slant: cut along the path through the least ink, not down a straight column.
    # For two, the path may start anywhere in the middle, as the thinnest columns may.
    for anchors, reach in [(cuts[1:], round(CUT_SEARCH * step))] + (
        [([glyph.width // 2], round((0.5 - PAIR_MARGIN) * glyph.width))] if count == 2 else []
    ):
        path = _path_cut(glyph, anchors, reach)
        if path is not None:
            out.append(path)
    # The same parts reached two ways are one reading: each costs the model (and the renders) only once.
    unique: dict[tuple, list[Glyph]] = {}
    for parts in out:
        unique.setdefault(_key(parts), parts)
    return list(unique.values())


def searched_cuts(glyph: Glyph, row: list[Glyph], tried: list[list[Glyph]]) -> list[list[Glyph]]:
    """The glyph cut in two straight down at every SEARCH_STEP of its width across its middle, less the cuts
    already `tried` (touching_cuts'); [] when it is narrower than SHAPED_CUTS_WIDTH of its row's height. Many
    tries, so some single digit's two halves will look like digits: the caller asks for more evidence before taking
    one (preprocess.choose)."""
    if glyph.width <= SHAPED_CUTS_WIDTH * _row_height(glyph, row):
        return []
    seen = {_key(parts) for parts in tried}
    step = max(1, round(SEARCH_STEP * glyph.width))
    out = []
    for column in range(round(PAIR_MARGIN * glyph.width), round((1 - PAIR_MARGIN) * glyph.width) + 1, step):
        left, right = _trimmed(glyph, 0, column), _trimmed(glyph, column, glyph.width)
        if left is None or right is None or (key := _key([left, right])) in seen:
            continue
        seen.add(key)
        out.append([left, right])
    return out


def _key(parts: list[Glyph]) -> tuple:
    """The same parts reached two ways have the same key."""
    return tuple((p.left, p.top, p.width, p.height, int(p.mask.sum())) for p in parts)


def _row_height(glyph: Glyph, row: list[Glyph]) -> float:
    """The usual height of a digit on the glyph's row (its own if taller): the unit of widths."""
    return max(float(np.median([g.height for g in row])), glyph.height)


def _piece_splits(glyph: Glyph, height: float) -> list[list[Glyph]]:
    """The glyph's pieces (8-connected) parted into a left and a right group by their centres, where both groups
    are tall enough to be digits (a 5's hat alone is not)."""
    runs = _runs(glyph.mask)
    labels, count = _label(runs, glyph.width)
    if count < 2 or count > MAX_PIECES:
        return []
    _, starts, stops = runs
    lengths = (stops - starts).astype(np.float64)
    area = np.bincount(labels, weights=lengths, minlength=count)
    centre = np.bincount(labels, weights=lengths * (starts + stops) / 2, minlength=count) / area
    order = np.argsort(centre)
    out = []
    for k in range(1, count):
        left = np.isin(labels, order[:k])
        parts = [_part(glyph, _paint(runs, chosen, (0, 0, glyph.height, glyph.width))) for chosen in (left, ~left)]
        if all(p is not None and p.height >= DIGIT_HEIGHT * height for p in parts):
            out.append(parts)
    return out[:PAIR_CUTS]


def _path_cut(glyph: Glyph, anchors: list[int], reach: int) -> list[Glyph] | None:
    """The glyph cut top to bottom near each anchor column along the path that crosses the least ink (a step
    sideways per row at most, a little dearer than straight on), or None if a part comes out empty."""
    mask = glyph.mask
    sides = []
    for anchor in anchors:
        lo, hi = max(0, anchor - reach), min(glyph.width, anchor + reach + 1)
        ink = mask[:, lo:hi].astype(np.float64)
        # Forward: the cheapest path's cost to every pixel, row by row (a few array operations per row); padded
        # with infinity so a path cannot leave the window.
        cost = np.full((ink.shape[0], ink.shape[1] + 2), np.inf)
        cost[0, 1:-1] = ink[0]
        for y in range(1, ink.shape[0]):
            above = cost[y - 1]
            cost[y, 1:-1] = np.minimum(above[1:-1], np.minimum(above[:-2], above[2:]) + SLANT_COST) + ink[y]
        # Back: from the cheapest end, step to whichever neighbour above the cost came from.
        x = int(cost[-1].argmin())
        column = np.empty(ink.shape[0], np.int64)
        for y in range(ink.shape[0] - 1, 0, -1):
            column[y] = x - 1
            above = cost[y - 1]
            straight, left, right = above[x], above[x - 1] + SLANT_COST, above[x + 1] + SLANT_COST
            x = x if straight <= min(left, right) else x - 1 if left <= right else x + 1
        column[0] = x - 1
        sides.append(np.arange(glyph.width)[None, :] < (lo + column)[:, None])
    parts, taken = [], np.zeros(mask.shape, bool)
    for side in [*sides, np.ones(mask.shape, bool)]:
        part = _part(glyph, mask & side & ~taken)
        taken |= side
        if part is None:
            return None
        parts.append(part)
    return parts


def reading_order(found: list[Glyph]) -> list[list[Glyph]]:
    """The glyphs as rows, top to bottom, each left to right: a glyph belongs to a row when its middle lies
    within the row's height so far."""
    rows: list[list[Glyph]] = []
    # The tallest first: they set the rows, and smaller glyphs then fall into them.
    for glyph in sorted(found, key=lambda g: -g.height):
        middle = glyph.top + glyph.height / 2
        for row in rows:
            if min(g.top for g in row) <= middle <= max(g.bottom for g in row):
                row.append(glyph)
                break
        else:
            rows.append([glyph])
    rows.sort(key=lambda row: min(g.top for g in row))
    return [sorted(row, key=lambda g: g.left) for row in rows]


def _trimmed(glyph: Glyph, start: int, stop: int) -> Glyph | None:
    """Columns start:stop of a glyph, trimmed to its ink (None where there is none)."""
    mask = np.zeros_like(glyph.mask)
    mask[:, start:stop] = glyph.mask[:, start:stop]
    return _part(glyph, mask)


def _part(glyph: Glyph, mask: np.ndarray) -> Glyph | None:
    """The pixels of `mask` (a subset of the glyph's, in its box) as a glyph of their own, trimmed to their ink
    (None where there is none)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    mask = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    share = float(mask.sum()) / max(1.0, float(glyph.mask.sum()))
    return Glyph(
        glyph.top + int(rows[0]),
        glyph.left + int(cols[0]),
        mask.shape[0],
        mask.shape[1],
        mask,
        glyph.mass * share,
    )


def side_by_side(found: list[Glyph]) -> list[Glyph]:
    """The glyphs that stand next to another of about their size on one line: the digits of a number (empty for
    one digit, with or without marks beside it)."""
    paired = set()
    for i, a in enumerate(found):
        for j in range(i + 1, len(found)):
            b = found[j]
            overlap = min(a.bottom, b.bottom) - max(a.top, b.top)
            sizes = sorted((max(a.height, a.width), max(b.height, b.width)))
            if overlap > 0.5 * min(a.height, b.height) and sizes[0] >= SAME_SIZE * sizes[1]:
                paired |= {i, j}
    return [found[k] for k in sorted(paired)]


# --- helpers -------------------------------------------------------------------------------------------


def border(gray: np.ndarray) -> np.ndarray:
    """The outer ring (2% of the shorter side, at least 1 pixel): where the paper is."""
    width = max(1, min(gray.shape) // 50)
    return np.concatenate(
        [
            gray[:width].ravel(),
            gray[-width:].ravel(),
            gray[width:-width, :width].ravel(),
            gray[width:-width, -width:].ravel(),
        ]
    )


def min_filter(values: np.ndarray, window: int) -> np.ndarray:
    """Grey-level erosion by a window x window square (edges replicated)."""
    return _rank_filter(values, window, np.minimum)


def max_filter(values: np.ndarray, window: int) -> np.ndarray:
    """Grey-level dilation by a window x window square (edges replicated)."""
    return _rank_filter(values, window, np.maximum)


def _rank_filter(values: np.ndarray, window: int, op: np.ufunc, pad: str = "edge") -> np.ndarray:
    """A separable square min/max filter, each axis by doubling: about 2 * log2(window) array operations."""
    return _running(_running(values, window, op, pad).T, window, op, pad).T


def _running(values: np.ndarray, window: int, op: np.ufunc, pad: str) -> np.ndarray:
    """op over `window` neighbours along the last axis, centred, the ends continued by `pad`."""
    radius = window // 2
    size, span = values.shape[1], 1
    widths = ((0, 0), (radius, window - 1 - radius))
    if pad != "edge":
        cur = np.pad(values, widths, mode=pad, reflect_type="odd")
    elif size:
        # By hand: np.pad costs tens of microseconds a call, a fifth of /read's time (each candidate's mask is
        # widened once).
        cur = np.empty((values.shape[0], size + window - 1), values.dtype)
        cur[:, radius : radius + size] = values
        cur[:, :radius] = values[:, :1]
        cur[:, radius + size :] = values[:, -1:]
    else:
        cur = np.pad(values, widths, mode="edge")
    # cur[:, i] covers span neighbours from i; doubling span each time, then two overlapping spans cover the window.
    while 2 * span <= window:
        cur = op(cur[:, :-span], cur[:, span:])
        span *= 2
    return op(cur[:, :size], cur[:, window - span : window - span + size])


def _spread(mask: np.ndarray, reach: int, axis: int, forward: bool) -> np.ndarray:
    """Whether any pixel within `reach` steps before (forward) or after a pixel along `axis` is set."""
    out = np.zeros_like(mask)
    size = mask.shape[axis]
    for step in range(1, min(reach, size - 1) + 1):
        if forward:  # ink at index i - step shows at i
            src, dst = slice(0, size - step), slice(step, size)
        else:
            src, dst = slice(step, size), slice(0, size - step)
        index_src = (src, slice(None)) if axis == 0 else (slice(None), src)
        index_dst = (dst, slice(None)) if axis == 0 else (slice(None), dst)
        out[index_dst] |= mask[index_src]
    return out


def _line_rows(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels in rows that hold a horizontal line: ink along at least LINE_FRACTION of the width,
    reaching the left or right edge, in a band of rows thin for its length (a digit's bar, even edge to edge in a
    tight crop, is far thicker). Counted, not traced, so a line broken by noise or faint ink still counts."""
    height, width = mask.shape
    out = np.zeros_like(mask)
    if max(height, width) < FLAT_BELOW:
        return out  # a digit tile: its strokes are the only lines
    tolerance = max(1, width // TILT_PIXELS)
    # Widen the mask across the lines so that a slightly tilted line still fills rows end to end.
    wide = mask | _spread(mask, tolerance, 0, True) | _spread(mask, tolerance, 0, False)
    rows = np.flatnonzero(np.count_nonzero(wide, axis=1) >= LINE_FRACTION * width)
    edge = max(1, width // 10)
    rows = rows[wide[rows, :edge].any(axis=1) | wide[rows, -edge:].any(axis=1)]
    if rows.size == 0:
        return out
    # Bands of consecutive rows; keep the thin ones.
    bands = [
        b
        for b in np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1)
        if b.size <= LINE_THICKNESS * width + 2 * tolerance
    ]
    if not bands:
        return out
    # Ruled or squared paper has several. A single one is a line only where it crosses the whole page and runs on
    # past the rest of the ink to an edge; otherwise it is a digit's own stroke: a 1 drawn tall on a canvas, or a
    # 7's bar in a tight crop.
    in_bands = np.zeros(height, bool)
    in_bands[np.concatenate(bands)] = True
    rest = mask[~in_bands].any(axis=0)
    end = max(1, width // 50) + tolerance
    for band in bands:
        reaches_left, reaches_right = wide[band, :end].any(), wide[band, -end:].any()
        runs_on = reaches_left and reaches_right and not (rest[:edge].any() and rest[-edge:].any())
        if len(bands) >= 3 or runs_on:
            # The band holds the line's middle; a tilted line's ends stray a few rows further out.
            rows = slice(max(0, band[0] - tolerance - 1), band[-1] + tolerance + 2)
            out[rows] = mask[rows]
    return out


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True: (row, start, stop) arrays, stop exclusive, in row-major order."""
    height, width = mask.shape
    padded = np.zeros((height, width + 2), np.int8)
    padded[:, 1:-1] = mask
    steps = np.diff(padded, axis=1)
    # One scan for both edges: starts (+1) and stops (-1) alternate along each row, so they pair up in order.
    flat = np.flatnonzero(steps)
    is_start = steps.ravel()[flat] == 1
    rows, starts = np.divmod(flat[is_start], width + 1)
    stops = flat[~is_start] % (width + 1)
    return rows, starts, stops


def _label(runs: tuple[np.ndarray, np.ndarray, np.ndarray], width: int) -> tuple[np.ndarray, int]:
    """8-connected component label of each run, and the number of components.

    Labels are 0..count-1 numbered in the order of each component's first run (row-major, as `_runs` lists them),
    and callers depend on it: `glyphs` groups the pieces in that order, and `_piece_splits`' order of pieces with
    equal centres follows from it.
    """
    rows, starts, stops = runs
    n = rows.size
    if n == 0:
        return np.zeros(0, np.int64), 0
    stride = width + 2
    start_keys = rows * stride + starts
    stop_keys = rows * stride + stops
    # Run b in the next row touches run a (8-connected) when b.start <= a.stop and b.stop >= a.start; runs of a
    # row are sorted and disjoint, so those b form one contiguous range of the (globally sorted) run list.
    first = np.searchsorted(stop_keys, (rows + 1) * stride + starts, side="left")
    last = np.searchsorted(start_keys, (rows + 1) * stride + stops, side="right")
    counts = np.maximum(last - first, 0)
    a = np.repeat(np.arange(n), counts)
    # The ranges laid end to end without a Python loop over runs: a crafted speckle upload leaves 125,571 runs, and
    # one small array per run took ~95 ms there (docs/preprocessing.md). Edge e of run i's block is first[i] plus
    # e's place in the block.
    block_starts = np.cumsum(counts) - counts
    b = np.arange(a.size) - np.repeat(block_starts - first, counts)
    # Union-find without a Python loop: hook each edge's two roots to the smaller, then compress every path. Every
    # tree with an edge to another hooks or is hooked, so the trees at least halve per round: O(log n) rounds.
    labels = np.arange(n)
    while a.size:
        roots_a, roots_b = labels[a], labels[b]
        low = np.minimum(roots_a, roots_b)
        new = labels.copy()
        np.minimum.at(new, roots_a, low)
        np.minimum.at(new, roots_b, low)
        while not np.array_equal(jumped := new[new], new):
            new = jumped
        if np.array_equal(new, labels):
            break
        labels = new
    # Each component's root is its smallest run (labels[root] == root), so numbering the roots in run order by a
    # running count gives the labels np.unique would, without its sort.
    is_root = labels == np.arange(n)
    compact = (np.cumsum(is_root) - 1)[labels]
    return compact, int(np.count_nonzero(is_root))


def _reduce(op: np.ufunc, labels: np.ndarray, values: np.ndarray, count: int, initial: int) -> np.ndarray:
    out = np.full(count, initial, dtype=np.int64)
    op.at(out, labels, values)
    return out


def _paint(
    runs: tuple[np.ndarray, np.ndarray, np.ndarray], chosen: np.ndarray | None, box: tuple[int, int, int, int]
) -> np.ndarray:
    """A bool image of the box (top, left, height, width) with the chosen runs set."""
    rows, starts, stops = runs
    if chosen is not None:
        rows, starts, stops = rows[chosen], starts[chosen], stops[chosen]
    top, left, height, width = box
    steps = np.zeros((height, width + 1), np.int32)
    np.add.at(steps, (rows - top, starts - left), 1)
    np.add.at(steps, (rows - top, stops - left), -1)
    return np.cumsum(steps, axis=1)[:, :width] > 0

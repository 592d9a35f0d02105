"""Uploaded image bytes -> the 28x28 float32 array an MNIST model expects.

Pure functions (Pillow + numpy only), so they are tested on their own and reused by the service.

The recipe is the one the makers of MNIST used (LeCun, Cortes, Burges): the digit's ink is cropped to its
bounding box, scaled to fit a 20x20 box keeping its aspect ratio with anti-aliasing, and placed in a 28x28
field so that its centre of mass lands on the centre. Measured on the 70,000 MNIST digits: the bounding box
of the non-zero pixels has a longest side of exactly 20 (99.97%), and the centre of mass, in pixel-index
coordinates (row, col) = sum(index * value) / sum(value), lies in [13.5, 14.5] on both axes -- an integer
shift rounded towards (14, 14). Real uploads add what MNIST never had: dark ink on light paper, colour,
transparency (canvas exports are often ink only in alpha), EXIF rotation, 16-bit depth, JPEG noise, big
margins. Those are undone first; an image already in MNIST format passes through unchanged.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ClientError
from . import segment

MNIST_SIDE = 28
DIGIT_BOX = 20
# Where MNIST puts the centre of mass (pixel-index coordinates, see the module docstring).
TARGET_CENTRE = 14.0

# Analysis runs on a copy whose longer side is at most this: enough for a digit that fills a tenth of a
# photo to still span 50 px (more than the 20 px it ends up as), and it bounds the per-image cost.
WORK_SIDE = 512

# Formats we decode. An explicit list, because Pillow's full set includes EPS (which runs Ghostscript)
# and rarely used parsers that add attack surface. (Phone JPEGs that Pillow calls MPO open through JPEG.)
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "DIB", "WEBP", "TIFF", "PPM", "TGA", "ICO", "AVIF")
_FORMAT_NAMES = "PNG, JPEG, GIF, BMP, WebP, TIFF"

# Ink must differ from the paper by at least this (on a 0..1 scale) and by this many noise sigmas (of
# the 3x3-smoothed image) to count as a digit: JPEG artefacts and sensor noise on blank paper stay below.
MIN_CONTRAST = 0.1
MIN_NOISE_SIGMAS = 6.0
# The border's noise is measured on stretches of this many pixels (see _noise).
NOISE_STRETCH = 64
# Mask for the bounding box: smoothed ink above this fraction of the contrast.
MASK_LEVEL = 0.3
# Ink values are stretched so that LOW..HIGH (fractions of the contrast) maps to 0..1: paper texture below
# LOW disappears, stroke cores above HIGH saturate, as about half of MNIST's ink pixels do (>= 224/255).
INK_LOW = 0.15
INK_HIGH = 0.75
# Stroke width relative to the digit's longer side (2 * area / perimeter of the inked mask): on MNIST's
# training digits the 5th, 50th and 95th percentiles are 0.064, 0.099 and 0.153. Finer strokes (a ballpoint on
# a big photo) are thickened to about the median before shrinking, or they would fade to faint one-pixel lines
# the model has never seen; bolder ones (a marker) are thinned to an upper-usual width.
THIN_STROKE = 0.06
TARGET_STROKE = 0.09
THICK_STROKE = 0.16
THICK_TARGET = 0.11
# /read: a glyph is read as touching digits only when the top logit of their least sure digit beats the whole's
# by this much; one too wide to be one digit, by any amount (one wider than any digit, always: Reading.several).
# Tuned on seed-1 pages of `make bench-read`, checked on seeds 0 and 2 (docs/preprocessing.md).
CUT_MARGIN = 2.5
WIDE_BONUS = 0.0
# ... and by SEARCH_MARGIN (SEARCH_WIDE_MARGIN for one too wide to be one digit) for a cut of the search
# (segment.searched_cuts): of the eight or so tries on a single digit, one may split it into two plausible halves by
# chance. Tuned on seeds 0 and 1, checked on seed 2 (docs/preprocessing.md).
SEARCH_MARGIN = 6.0
SEARCH_WIDE_MARGIN = 1.0
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Pixels kept around the digit's mask: its anti-aliased edges, fainter than the mask's level.
EDGE_PIXELS = 2


class ImageError(ClientError):
    """The client sent something we cannot turn into a digit; str(e) names the problem.

    `status` is the HTTP status to answer with: 400 bad/undecodable/blank image, 413 too many bytes or
    pixels, 422 bad pixel array.
    """


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode `data` (any format in FORMATS) into a loaded Pillow image, EXIF orientation applied.

    The pixel count is checked from the header before anything is decoded, so a small file that claims
    huge dimensions (a decompression bomb) costs nothing. Every Pillow failure becomes an ImageError.
    """
    size = len(data)
    if size == 0:
        raise ImageError(400, "empty image: the upload has no bytes")
    if size > max_bytes:
        raise ImageError(413, f"image too large: {size} bytes; the limit is {max_bytes} bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError(413, f"image has too many pixels: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(400, f"not an image: the bytes are not a {_FORMAT_NAMES} file") from exc
    except Exception as exc:  # Pillow's parsers raise many types (SyntaxError, struct.error, ...)
        raise ImageError(400, f"not an image: unreadable header ({exc})") from exc

    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            413,
            f"image has too many pixels: {width}x{height} = {width * height}; the limit is {max_pixels}",
        )
    if width == 0 or height == 0:
        raise ImageError(400, f"image has no pixels: {width}x{height}")
    try:
        if image.format in ("JPEG", "MPO") and max(width, height) > WORK_SIDE:
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale for almost nothing: big photos get cheap. The smallest
            # scale that keeps at least half of WORK_SIDE (an 800x600 phone photo is analysed at 400x300).
            image.draft(None, (WORK_SIDE // 2, WORK_SIDE // 2))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    except Image.DecompressionBombError as exc:
        raise ImageError(413, f"image has too many pixels: {exc}") from exc
    except Exception as exc:  # truncated files raise OSError, broken ones anything
        raise ImageError(400, f"could not decode the {image.format} image: {exc}") from exc
    return image


def header_pixels(data: bytes) -> int:
    """Width x height as the image's header declares it; 0 when there is no readable header (decoding will
    then say what is wrong). A PNG is read from its IHDR in ~1 us, other formats by Pillow's parser (~20 us).
    """
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width * height
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.width * image.height
    except Exception:  # not an image, or a broken one: not ours to report here
        return 0


def preprocess(data: bytes, *, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Image bytes -> float32 (28, 28) in [0, 1], white ink on black, MNIST-normalised."""
    return to_mnist(decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels))


@dataclass(frozen=True)
class Reading:
    """One digit found on a page: where it is and what the model is shown."""

    box: tuple[int, int, int, int]  # x, y, width, height in the upload's pixels (after EXIF orientation)
    pixels: np.ndarray  # float32 (28, 28) in [0, 1], white ink on black, MNIST-normalised
    # For a glyph wide enough to be digits that touch: ways to cut the same ink into them; the caller asks the
    # model which reading is the most likely (see `choose`).
    cuts: tuple[tuple[Reading, ...], ...] = ()
    searched: tuple[tuple[Reading, ...], ...] = ()  # more cuts in two, from a search (segment.searched_cuts)
    wide: bool = False  # wider than one digit usually is on its row: a cut is favoured
    several: bool = False  # wider than one digit ever is on its row: a cut, if there is one, is taken


@dataclass(frozen=True)
class _Page:
    """An upload analysed: its ink on the analysis copy (ink-bright, the paper's light divided out), or the
    MNIST digit it already is."""

    ink: np.ndarray
    smooth: np.ndarray  # 3x3 mean of ink
    contrast: float
    scale: float  # upload pixels per analysis pixel
    passed: np.ndarray | None = None  # a 28x28 already in MNIST form, as it is


def to_mnist(image: Image.Image) -> np.ndarray:
    """A decoded image of any mode and size -> float32 (28, 28) in [0, 1], white ink on black.

    A 28x28 image that already looks like MNIST (dark background, ink within a 20x20 box, centre of mass
    at (14, 14)) is returned as its pixels / 255, bit for bit (inverted exactly if it is black on white).
    Raises ImageError(400) when there is no ink, ImageError(422) for several digits side by side.
    """
    page = _analyse(image)
    if page.passed is not None:
        return page.passed
    digits = _digits(page)
    number = segment.side_by_side(digits)
    if number:
        raise ImageError(
            422,
            f"found {len(number)} digits side by side; /predict reads one digit per image: "
            "send the whole number to /read, or one digit per image",
        )
    return _render(page, max(digits, key=lambda g: g.mass))


def read_digits(image: Image.Image, *, max_digits: int) -> list[list[Reading]]:
    """Every digit on the page, as rows top to bottom, each left to right; each digit goes through the same
    MNIST recipe as `to_mnist`. A glyph wide enough to be digits that touch also carries its cut into them
    (`Reading.parts`), to be chosen by the model.

    Raises ImageError(400) when there is no digit, ImageError(413) for more than `max_digits`.
    """
    page = _analyse(image)
    if page.passed is not None:
        return [[Reading((0, 0, MNIST_SIDE, MNIST_SIDE), page.passed)]]
    rows = segment.reading_order(_digits(page))
    count = sum(len(row) for row in rows)
    if count > max_digits:
        raise ImageError(413, f"found {count} digits; the limit is {max_digits} per image (MNIST_MAX_DIGITS)")
    return [[_reading(page, glyph, row) for glyph in row] for row in rows]


def _reading(page: _Page, glyph: segment.Glyph, row: list[segment.Glyph]) -> Reading:
    """One glyph of `row` as a Reading, with its cuts' parts (each read alone: `row` empty).

    A module function, not one nested in read_digits: a nested function that calls itself holds its own closure
    cell, a reference cycle that kept each /read's page (its ink and smooth arrays, ~50 KB) alive until the cycle
    collector ran, which the serving worker's raised thresholds (service.tune_garbage_collector) make rare: worker
    memory grew for as long as /read was called (docs/benchmarks.md, "Soak (memory growth)")."""
    cuts = segment.touching_cuts(glyph, row) if row else []
    searched = segment.searched_cuts(glyph, row, cuts) if row else []
    return Reading(
        _box(glyph, page.scale),
        _render(page, glyph),
        tuple(tuple(_reading(page, p, []) for p in cut) for cut in cuts),
        tuple(tuple(_reading(page, p, []) for p in cut) for cut in searched),
        wide=bool(row) and segment.too_wide(glyph, row),
        several=bool(row) and segment.too_wide(glyph, row, segment.SEVERAL_WIDTH),
    )


def candidates(rows: list[list[Reading]]) -> list[Reading]:
    """What to run through the model for a `read_digits` result, in order: each reading, then the parts of its cuts,
    then of its searched cuts."""
    return [
        c
        for row in rows
        for reading in row
        for c in (reading, *(p for cut in (*reading.cuts, *reading.searched) for p in cut))
    ]


def choose(rows: list[list[Reading]], evidence: Sequence[float]) -> list[list[int]]:
    """Per row, the indices (into `candidates(rows)`) of the digits read, given the model's evidence for each
    candidate's digit (its top logit, Model.predict_for_reading): of a glyph read whole and its cuts into
    touching digits, the one whose least sure digit is the surest wins, a cut less its margin (CUT_MARGIN, or
    -WIDE_BONUS for a glyph too wide to be one digit; SEARCH_MARGIN or SEARCH_WIDE_MARGIN for a searched cut).
    For a glyph wider than any digit, the best cut wins.

    Logits, not probabilities: a touching "81" read whole is a perfect 8 at probability ~1, as are its two cut
    digits, so probabilities could not tell them apart; the whole's top logit is smaller."""
    out, i = [], 0
    for row in rows:
        chosen = []
        for reading in row:
            margins = (-WIDE_BONUS, SEARCH_WIDE_MARGIN) if reading.wide else (CUT_MARGIN, SEARCH_MARGIN)
            cut_anyway = reading.several and bool(reading.cuts or reading.searched)
            best, best_score = [i], -math.inf if cut_anyway else evidence[i]
            i += 1
            for cuts, margin in zip((reading.cuts, reading.searched), margins, strict=True):
                for cut in cuts:
                    parts = list(range(i, i + len(cut)))
                    score = min(evidence[k] for k in parts) - margin
                    if score > best_score:
                        best, best_score = parts, score
                    i += len(cut)
            chosen += best
        out.append(chosen)
    return out


def _analyse(image: Image.Image) -> _Page:
    image = _simple_mode(image)
    scale = 1.0
    if max(image.size) > WORK_SIDE:
        scale = max(image.size) / WORK_SIDE
        size = (max(1, round(image.width / scale)), max(1, round(image.height / scale)))
        # BOX is area averaging: the right anti-aliasing for a shrink; LA/RGBA are premultiplied by Pillow.
        image = image.resize(size, Image.Resampling.BOX)
    gray8, gray, alpha = _planes(image)
    if alpha is not None:
        gray = _composite(gray, alpha)
        gray8 = None
    # Fast path for what MNIST clients send: 28x28, black border, clear ink. It gives the same answer as
    # the general path below (background 0, no noise, no inversion) at half the cost.
    if (
        image.size == (MNIST_SIDE, MNIST_SIDE)
        and gray8 is not None
        and not segment.border(gray8).any()
        and gray8.max() >= 255 * MIN_CONTRAST
    ):
        passed = _mnist_pass_through(gray8, gray)
        if passed is not None:
            return _Page(gray, gray, 1.0, scale, passed)

    smooth = _smooth3(gray)
    border = segment.border(gray)
    background = float(np.median(border))
    noise = _noise(border) / 3.0  # of the 3x3 mean
    # Polarity: the ink is whichever side of the paper's level has the larger excursion. Dark ink on
    # light paper gets inverted, so the ink is bright as in MNIST (and a shadow becomes a bright region).
    if background - float(smooth.min()) > float(smooth.max()) - background:
        gray = 1.0 - gray
        smooth = 1.0 - smooth
        background = 1.0 - background
        gray8 = None if gray8 is None else 255 - gray8
    contrast = float(smooth.max()) - background
    if contrast < MIN_CONTRAST or contrast < MIN_NOISE_SIGMAS * noise:
        raise ImageError(400, "no digit found: the image is blank or has too little contrast")

    # Ink strength with the paper's uneven light divided out (segment.flatten): paper ~0 everywhere, so a page
    # whose only contrast was a shadow or a gradient has none left.
    ink = segment.flatten(gray)
    smooth = _smooth3(ink)
    contrast = float(smooth.max())
    if contrast < MIN_CONTRAST:
        raise ImageError(400, "no digit found: only shadows or uneven light on the page")
    passed = _mnist_pass_through(gray8, gray) if image.size == (MNIST_SIDE, MNIST_SIDE) else None
    return _Page(ink, smooth, contrast, scale, passed)


def _digits(page: _Page) -> list[segment.Glyph]:
    """The digit-sized glyphs on the page: lines, shadows' edges and specks dropped."""
    mask = page.smooth > MASK_LEVEL * page.contrast
    mask &= ~segment.remove_lines(mask)
    digits = segment.digit_sized(segment.glyphs(page.ink, mask), mask.shape)
    if not digits:
        raise ImageError(400, "no digit found: only lines, specks or shadows on the page")
    return digits


def _render(page: _Page, digit: segment.Glyph) -> np.ndarray:
    """One glyph through MNIST's recipe: its ink stretched, strokes normalised, fit to 20x20, centred in 28x28."""
    # Stretch by the digit's own contrast (a removed line or a darker speck may have had more).
    contrast = float(page.smooth[digit.top : digit.bottom, digit.left : digit.right][digit.mask].max())
    low, high = INK_LOW * contrast, INK_HIGH * contrast
    strokes = (_crop(page.ink, digit) - low) * (1.0 / (high - low))
    return _place(_normalise_strokes(np.clip(strokes, 0.0, 1.0, out=strokes)))


def _box(glyph: segment.Glyph, scale: float) -> tuple[int, int, int, int]:
    return (
        round(glyph.left * scale),
        round(glyph.top * scale),
        max(1, round(glyph.width * scale)),
        max(1, round(glyph.height * scale)),
    )


def pixels_to_array(pixels: object) -> np.ndarray:
    """A JSON 28x28 list of lists of numbers in [0, 1] -> float32 (28, 28); ImageError(422) otherwise."""
    if not isinstance(pixels, list):
        raise ImageError(422, f"pixels must be a list of 28 rows of 28 numbers, got {type(pixels).__name__}")
    if len(pixels) == MNIST_SIDE * MNIST_SIDE and not any(isinstance(row, list) for row in pixels):
        raise ImageError(422, "pixels must be 28 rows of 28 numbers, got a flat list of 784")
    if len(pixels) != MNIST_SIDE:
        raise ImageError(422, f"pixels must have 28 rows, got {len(pixels)}")
    for i, row in enumerate(pixels):
        if not isinstance(row, list):
            raise ImageError(422, f"pixels[{i}] must be a list of 28 numbers, got {type(row).__name__}")
        if len(row) != MNIST_SIDE:
            raise ImageError(422, f"pixels[{i}] must have 28 numbers, got {len(row)}")
        for j, value in enumerate(row):
            # bool is an int in Python, but `true` is not a pixel value.
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ImageError(422, f"pixels[{i}][{j}] is not a number: {value!r}")
            if not math.isfinite(value):
                raise ImageError(422, f"pixels[{i}][{j}] is {value}; pixel values must be finite")
            if not 0.0 <= value <= 1.0:
                raise ImageError(422, f"pixels[{i}][{j}] = {value} is outside [0, 1] (divide 0-255 values by 255)")
    return np.array(pixels, dtype=np.float32)


def to_png(array: np.ndarray) -> bytes:
    """A (28, 28) array in [0, 1] -> 8-bit grayscale PNG bytes (round(value * 255))."""
    if array.shape != (MNIST_SIDE, MNIST_SIDE):
        raise ValueError(f"expected a (28, 28) array, got {array.shape}")
    pixels = np.clip(np.rint(np.asarray(array, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()


def _simple_mode(image: Image.Image) -> Image.Image:
    """Reduce Pillow's many modes to L, LA, RGB, RGBA or F (float, scaled to [0, 1])."""
    mode = image.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        if "transparency" in image.info and mode in ("L", "RGB"):
            return image.convert(mode + "A")  # a tRNS colour key: that colour is transparent
        return image
    if mode == "1":
        return image.convert("L")
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info or image.palette.mode == "RGBA"
        return image.convert("RGBA" if has_alpha else "RGB")
    if mode in ("La", "RGBa"):
        return image.convert(mode[:-1] + "A")
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if mode.startswith("I;16"):
            scale = 65535.0  # 16-bit: the full range, not clipped at 255
        else:
            # 32-bit int or float modes carry no declared range: take the smallest usual one that fits.
            top = float(np.nanmax(values)) if values.size else 0.0
            scale = next((s for s in (1.0, 255.0, 65535.0) if top <= s), top)
        values = np.nan_to_num(values / np.float32(scale), nan=0.0, posinf=1.0, neginf=0.0)
        return Image.fromarray(np.clip(values, 0.0, 1.0, out=values), mode="F")
    try:
        return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV
    except Exception as exc:
        raise ImageError(400, f"unsupported image mode {mode}") from exc


def _planes(image: Image.Image) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    """(gray as uint8 or None for float images, gray float32 [0, 1], alpha float32 [0, 1] or None)."""
    if image.mode == "F":
        return None, np.asarray(image, dtype=np.float32), None
    gray8 = np.asarray(image if image.mode == "L" else image.convert("L"))
    alpha = None
    if image.mode in ("LA", "RGBA"):
        alpha8 = np.asarray(image.getchannel("A"))
        if alpha8.min() < 255:
            alpha = alpha8.astype(np.float32) / np.float32(255)
    return gray8, gray8.astype(np.float32) / np.float32(255), alpha


def _composite(gray: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Flatten a transparent image onto the background that shows its ink.

    White, as a browser shows it, so black or coloured ink on transparent pixels (a canvas export, often
    with all-zero RGB: the ink is only in alpha) and photos with transparent padding come out right. The
    exception is light ink of one colour (a dark-mode canvas): on white it would vanish, so it goes on black.
    """
    weight = float(alpha.sum())
    ink = float((gray * alpha).sum()) / weight if weight else 0.0
    opaque = gray[alpha >= 0.9]
    uniform = opaque.size == 0 or float(opaque.max()) - float(opaque.min()) < 0.25
    background = 0.0 if ink > 0.5 and uniform else 1.0
    return gray * alpha + background * (1.0 - alpha)


def _noise(border: np.ndarray) -> float:
    """The sensor noise (sigma) of the paper along the page's border.

    From the median absolute deviation of short stretches of the border, each about its own median, and the
    lower quartile of those: ink or a ruled line that touches the border, a shadow's step or a gradient along
    it raise some stretches' deviation, not most of them. (One deviation over the whole border took squared
    paper's dense grid for noise, 30 times the real one, and refused the digit on it as "too little contrast".)
    """
    count = border.size // NOISE_STRETCH
    if count < 4:
        return 1.4826 * float(np.median(np.abs(border - np.median(border))))
    stretches = border[: count * NOISE_STRETCH].reshape(count, NOISE_STRETCH)
    deviation = np.median(np.abs(stretches - np.median(stretches, axis=1, keepdims=True)), axis=1)
    return 1.4826 * float(np.percentile(deviation, 25))


def _smooth3(gray: np.ndarray) -> np.ndarray:
    """3x3 mean (edges replicated): single noisy pixels and JPEG ringing must not count as ink."""
    padded = np.pad(gray, 1, mode="edge")
    rows = padded[:-2] + padded[1:-1] + padded[2:]
    return (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) * np.float32(1.0 / 9.0)


def _mnist_pass_through(gray8: np.ndarray | None, gray: np.ndarray) -> np.ndarray | None:
    """A 28x28 image already normalised like MNIST, exactly as it is; None when it needs normalising."""
    nonzero = gray8 > 0 if gray8 is not None else gray > 0.5 / 255
    rows, cols = np.flatnonzero(nonzero.any(axis=1)), np.flatnonzero(nonzero.any(axis=0))
    if rows[-1] - rows[0] >= DIGIT_BOX or cols[-1] - cols[0] >= DIGIT_BOX:
        return None
    cy, cx = _centre_of_mass(gray)
    if abs(cy - TARGET_CENTRE) > 1.0 or abs(cx - TARGET_CENTRE) > 1.0:
        return None
    if gray8 is not None:
        return gray8.astype(np.float32) / np.float32(255)  # bit-exact: what MNIST's own loaders give
    return np.ascontiguousarray(gray, dtype=np.float32)


def _centre_of_mass(values: np.ndarray) -> tuple[float, float]:
    total = float(values.sum())
    rows = float(values.sum(axis=1) @ np.arange(values.shape[0], dtype=np.float32)) / total
    cols = float(values.sum(axis=0) @ np.arange(values.shape[1], dtype=np.float32)) / total
    return rows, cols


def _normalise_strokes(ink: np.ndarray) -> np.ndarray:
    """Bring stroke widths far outside MNIST's (see THIN_STROKE, THICK_STROKE) towards its usual ones.

    Fine pens are widened by a grey-level dilation, markers narrowed by an erosion (and the ink re-cropped, as
    the erosion shrinks it): 28x28 strokes then look like the ones the model learned from.
    """
    mask = ink > 0.5
    area = int(np.count_nonzero(mask))
    perimeter = int(np.count_nonzero(np.diff(mask, axis=0))) + int(np.count_nonzero(np.diff(mask, axis=1)))
    side = max(ink.shape)
    if area == 0 or perimeter == 0 or THIN_STROKE * side <= 2 * area / perimeter <= THICK_STROKE * side:
        return ink
    width = 2 * area / perimeter
    if side > 4 * DIGIT_BOX:
        # Work at 4x the final size: a few shifts instead of dozens, and the shrink anti-aliases anyway.
        scale = 4 * DIGIT_BOX / side
        size = (max(1, round(ink.shape[1] * scale)), max(1, round(ink.shape[0] * scale)))
        ink = np.asarray(Image.fromarray(ink, mode="F").resize(size, Image.Resampling.BOX))
        side, width = max(ink.shape), width * scale
    thin = width < THIN_STROKE * side
    radius = round(abs((TARGET_STROKE if thin else THICK_TARGET) * side - width) / 2)
    if radius < 1:
        return ink
    if thin:
        return segment.max_filter(np.pad(ink, radius), 2 * radius + 1)
    eroded = segment.min_filter(ink, 2 * radius + 1)
    inked = eroded > 0.5 / 255
    if not inked.any():
        return ink
    rows, cols = np.flatnonzero(inked.any(axis=1)), np.flatnonzero(inked.any(axis=0))
    return eroded[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _crop(ink: np.ndarray, digit: segment.Glyph) -> np.ndarray:
    """The digit's box (as MNIST's makers cropped: to the ink's mask) with nothing of the other ink in it; the
    digit's own mask is widened by EDGE_PIXELS to keep its soft edges."""
    own = segment.max_filter(digit.mask.astype(np.float32), 2 * EDGE_PIXELS + 1) > 0
    return ink[digit.top : digit.bottom, digit.left : digit.right] * own


def _place(ink: np.ndarray) -> np.ndarray:
    """Scale the cropped ink to fit 20x20 (aspect kept, anti-aliased) and centre its mass in 28x28."""
    height, width = ink.shape
    scale = DIGIT_BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Lanczos on float pixels: anti-aliased when shrinking (its kernel widens with the factor), sharp when
    # enlarging; the small over/undershoots it leaves are clipped.
    small = np.asarray(Image.fromarray(ink, mode="F").resize(size, Image.Resampling.LANCZOS))
    small = np.clip(small, 0.0, 1.0)
    out = np.zeros((MNIST_SIDE, MNIST_SIDE), dtype=np.float32)
    if float(small.sum()) == 0.0:
        raise ImageError(400, "no digit found: the ink vanishes at 28x28")
    cy, cx = _centre_of_mass(small)
    # An integer shift, rounded half up, as MNIST's centres of mass show; kept inside the 28x28 field.
    top = min(max(math.floor(TARGET_CENTRE - cy + 0.5), 0), MNIST_SIDE - small.shape[0])
    left = min(max(math.floor(TARGET_CENTRE - cx + 0.5), 0), MNIST_SIDE - small.shape[1])
    out[top : top + small.shape[0], left : left + small.shape[1]] = small
    return out

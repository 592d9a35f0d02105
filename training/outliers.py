"""Images that are not digits, in MNIST's format, for outlier exposure in training and for the held-out OOD test.

Every image is made the way MNIST made its digits (and the way the service's preprocessing makes an upload):
white ink on black, the ink cropped to its bounding box, scaled to fit 20x20 keeping its aspect ratio, and
placed in 28x28 with its centre of mass at (14, 14). So the model learns what a non-digit looks like *after*
preprocessing, which is all it ever sees.

Two disjoint sets, so the evaluation measures generalisation rather than memory:

- ``training_outliers``: letters and symbols rendered in the training faces (DejaVu Sans, Sans Bold, Serif,
  Serif Bold), polygons, stars, crosses, zigzags, scribbles, hatching, uniform specks, smooth random blobs, and
  hand-drawn shapes (training/shapes.py: faces, hearts, arrows, ticks... whose held-out set is another seed's).
- ``held_out_outliers`` (never seen in training, never used to choose a threshold): the same letters in
  *other* faces (DejaVu Sans Mono and Sans Mono Bold, slanted), smileys, hearts, spirals, arrows, houses,
  clustered specks, blank pages with a soft shadow, and photo-like gradients. Smileys, hearts and arrows are
  geometric drawings here (perfect circles and curves), unlike training/shapes.py's hand-drawn ones, but no longer
  families the model has never seen anything like since those joined the training outliers.

Letters that are drawn like digits in most hands and faces are left out of both sets, because the honest
answer for them is a digit: O o Q D (0), I l i j (1), Z z (2), S s (5), b G (6), T (7), B (8), g q (9).
All six font files come with Debian's fonts-dejavu-core (scripts/install-system-deps.sh installs it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
TRAINING_FACES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf")
HELD_OUT_FACES = ("DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf")
AMBIGUOUS = "OoQDIlijZzSsbGTBgq"  # shaped like 0, 1, 2, 5, 6, 7, 8, 9 in most faces and hands
LETTERS = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in AMBIGUOUS)
SYMBOLS = "#%&@+*=<>?!~{}"
CANVAS = 64  # drawing resolution; the result is shrunk to 20x20 anyway
MNIST_SIDE, DIGIT_BOX, CENTRE = 28, 20, 14.0


class FontError(RuntimeError):
    """A DejaVu face the outlier sets need is not installed."""


def to_mnist(ink: np.ndarray) -> np.ndarray:
    """White-on-black float ink (any size, values in [0, 1]) -> uint8 [28, 28] in MNIST's format.

    Crop to the ink, scale to fit 20x20 (aspect kept, anti-aliased), shift the centre of mass to (14, 14).
    An image with no ink comes back black.
    """
    ink = np.where(ink > 0.05, ink, 0.0).astype(np.float32)
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    out = np.zeros((MNIST_SIDE, MNIST_SIDE), dtype=np.float32)
    if rows.size == 0:
        return out.astype(np.uint8)
    ink = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    ink = ink / ink.max()  # the service stretches contrast the same way
    height, width = ink.shape
    scale = DIGIT_BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.clip(np.asarray(Image.fromarray(ink, mode="F").resize(size, Image.Resampling.LANCZOS)), 0, 1)
    total = float(small.sum())
    if total == 0.0:
        return out.astype(np.uint8)
    cy = float(small.sum(axis=1) @ np.arange(small.shape[0])) / total
    cx = float(small.sum(axis=0) @ np.arange(small.shape[1])) / total
    top = min(max(math.floor(CENTRE - cy + 0.5), 0), MNIST_SIDE - small.shape[0])
    left = min(max(math.floor(CENTRE - cx + 0.5), 0), MNIST_SIDE - small.shape[1])
    out[top : top + small.shape[0], left : left + small.shape[1]] = small
    return np.round(out * 255).astype(np.uint8)


def _fonts(faces: tuple[str, ...]) -> list[Path]:
    paths = [FONT_DIR / face for face in faces]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FontError(
            f"missing fonts {', '.join(missing)} in {FONT_DIR}: install Debian's fonts-dejavu-core "
            "(apt-get install fonts-dejavu-core, or `make sysdeps`)"
        )
    return paths


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("L", (CANVAS, CANVAS), 0)
    return image, ImageDraw.Draw(image)


def _as_ink(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255.0


def _width(rng: np.random.Generator) -> int:
    return int(rng.integers(3, 8))  # 3-7 px on a 64 px canvas: MNIST's 2-3 px strokes once shrunk


def _text(chars: str, fonts: list[Path], slant: float) -> Callable[[np.random.Generator], np.ndarray]:
    cache: dict[Path, ImageFont.FreeTypeFont] = {}

    def make(rng: np.random.Generator) -> np.ndarray:
        path = fonts[int(rng.integers(len(fonts)))]
        font = cache.setdefault(path, ImageFont.truetype(str(path), 44))
        image, draw = _canvas()
        draw.text((CANVAS / 2, CANVAS / 2), chars[int(rng.integers(len(chars)))], fill=255, font=font, anchor="mm")
        shear = rng.uniform(-slant, slant)
        angle = rng.uniform(-12, 12)
        image = image.transform(image.size, Image.Transform.AFFINE, (1, shear, -shear * CANVAS / 2, 0, 1, 0))
        return _as_ink(image.rotate(angle, resample=Image.Resampling.BILINEAR))

    return make


def _points(rng: np.random.Generator, n: int, radius: float, jitter: float = 0.08) -> list[tuple[float, float]]:
    start = rng.uniform(0, 2 * math.pi)
    out = []
    for k in range(n):
        a = start + 2 * math.pi * k / n
        r = radius * (1 + rng.uniform(-jitter, jitter))
        out.append((CANVAS / 2 + r * math.cos(a), CANVAS / 2 + r * math.sin(a)))
    return out


def polygon(rng: np.random.Generator) -> np.ndarray:
    image, draw = _canvas()
    n = int(rng.integers(3, 7))
    pts = _points(rng, n, rng.uniform(16, 28))
    if rng.random() < 0.25:
        draw.polygon(pts, fill=255)
    else:
        draw.line([*pts, pts[0]], fill=255, width=_width(rng), joint="curve")
    return _as_ink(image)


def star(rng: np.random.Generator) -> np.ndarray:
    image, draw = _canvas()
    n = int(rng.integers(5, 9))
    outer, inner = _points(rng, n, 28), _points(rng, n, rng.uniform(8, 14))
    pts = [p for pair in zip(outer, inner, strict=True) for p in pair]
    draw.line([*pts, pts[0]], fill=255, width=_width(rng), joint="curve")
    return _as_ink(image)


def cross(rng: np.random.Generator) -> np.ndarray:
    image, draw = _canvas()
    w = _width(rng)
    for a in rng.uniform(0, math.pi) + np.arange(int(rng.integers(2, 5))) * math.pi / 4:
        dx, dy = 26 * math.cos(a), 26 * math.sin(a)
        draw.line([(32 - dx, 32 - dy), (32 + dx, 32 + dy)], fill=255, width=w)
    return _as_ink(image)


def zigzag(rng: np.random.Generator) -> np.ndarray:
    image, draw = _canvas()
    n = int(rng.integers(4, 9))
    xs = np.linspace(6, 58, n)
    ys = np.where(np.arange(n) % 2 == 0, 32 - rng.uniform(8, 20), 32 + rng.uniform(8, 20))
    draw.line(list(zip(xs, ys, strict=True)), fill=255, width=_width(rng), joint="curve")
    return _as_ink(image)


def scribble(rng: np.random.Generator) -> np.ndarray:
    image, draw = _canvas()
    steps = rng.normal(0, 7, size=(int(rng.integers(8, 25)), 2))
    pts = np.clip(32 + np.cumsum(steps, axis=0) - steps.mean(0) * np.arange(len(steps))[:, None], 4, 60)
    draw.line([tuple(p) for p in pts], fill=255, width=_width(rng), joint="curve")
    return _as_ink(image)


def hatching(rng: np.random.Generator) -> np.ndarray:
    image, draw = _canvas()
    w, gap = _width(rng), int(rng.integers(9, 15))
    for direction in range(int(rng.integers(1, 3))):
        for k in range(8, 58, gap):
            draw.line([(k, 6), (k, 58)] if direction else [(6, k), (58, k)], fill=255, width=w)
    return _as_ink(image.rotate(rng.uniform(0, 90), resample=Image.Resampling.BILINEAR))


def specks(rng: np.random.Generator) -> np.ndarray:
    ink = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    n = int(rng.integers(4, 60))
    ys, xs = rng.integers(0, CANVAS, n), rng.integers(0, CANVAS, n)
    for y, x in zip(ys, xs, strict=True):
        r = int(rng.integers(1, 3))
        ink[max(y - r, 0) : y + r, max(x - r, 0) : x + r] = rng.uniform(0.5, 1)
    return ink


def blob(rng: np.random.Generator) -> np.ndarray:
    """A smooth random field: low-frequency noise, blown up to the canvas, thresholded softly."""
    coarse = rng.random((int(rng.integers(2, 6)),) * 2).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse, mode="F").resize((CANVAS, CANVAS), Image.Resampling.BICUBIC))
    return np.clip((field - rng.uniform(0.2, 0.6)) * rng.uniform(1.5, 4), 0, 1)


# Held-out families: shapes, noise and shading the training set does not contain.


def smiley(rng: np.random.Generator) -> np.ndarray:
    image, draw = _canvas()
    w, r = _width(rng), rng.uniform(22, 29)
    draw.ellipse([32 - r, 32 - r, 32 + r, 32 + r], outline=255, width=w)
    eye = rng.uniform(2.5, 5)
    for ex in (32 - r / 2.6, 32 + r / 2.6):
        ey = 32 - r / 3
        draw.ellipse([ex - eye, ey - eye, ex + eye, ey + eye], fill=255)
    mouth = r * 0.55
    top = 32 + r / 10
    span = (20, 160) if rng.random() < 0.8 else (200, 340)  # smiling or frowning
    draw.arc([32 - mouth, top - mouth / 2, 32 + mouth, top + mouth / 1.2], *span, fill=255, width=w)
    return _as_ink(image.rotate(rng.uniform(-20, 20), resample=Image.Resampling.BILINEAR))


def heart(rng: np.random.Generator) -> np.ndarray:
    image, draw = _canvas()
    t = np.linspace(0, 2 * math.pi, 60)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    s = rng.uniform(1.3, 1.8)
    pts = list(zip(32 + s * x, 32 + s * y, strict=True))
    if rng.random() < 0.3:
        draw.polygon(pts, fill=255)
    else:
        draw.line(pts, fill=255, width=_width(rng), joint="curve")
    return _as_ink(image.rotate(rng.uniform(-25, 25), resample=Image.Resampling.BILINEAR))


def spiral(rng: np.random.Generator) -> np.ndarray:
    image, draw = _canvas()
    turns = rng.uniform(1.8, 3.5)
    t = np.linspace(0, turns * 2 * math.pi, 120)
    r = 28 * t / t[-1]
    sign = rng.choice([-1, 1])
    draw.line(list(zip(32 + r * np.cos(sign * t), 32 + r * np.sin(t), strict=True)), fill=255, width=_width(rng))
    return _as_ink(image)


def arrow(rng: np.random.Generator) -> np.ndarray:
    image, draw = _canvas()
    w = _width(rng)
    draw.line([(6, 32), (58, 32)], fill=255, width=w)
    head = rng.uniform(10, 18)
    draw.line([(58 - head, 32 - head), (58, 32), (58 - head, 32 + head)], fill=255, width=w, joint="curve")
    if rng.random() < 0.4:  # double-headed
        draw.line([(6 + head, 32 - head), (6, 32), (6 + head, 32 + head)], fill=255, width=w, joint="curve")
    return _as_ink(image.rotate(rng.uniform(0, 360), resample=Image.Resampling.BILINEAR))


def house(rng: np.random.Generator) -> np.ndarray:
    image, draw = _canvas()
    w = _width(rng)
    draw.line([(14, 30), (14, 58), (50, 58), (50, 30), (14, 30), (32, 8), (50, 30)], fill=255, width=w, joint="curve")
    if rng.random() < 0.6:
        draw.rectangle([27, 42, 37, 58], outline=255, width=max(2, w - 2))
    return _as_ink(image.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BILINEAR))


def clustered_specks(rng: np.random.Generator) -> np.ndarray:
    ink = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    for _ in range(int(rng.integers(2, 6))):
        cy, cx = rng.uniform(8, 56, 2)
        n = int(rng.integers(3, 15))
        ys = np.clip(rng.normal(cy, 5, n), 1, CANVAS - 2).astype(int)
        xs = np.clip(rng.normal(cx, 5, n), 1, CANVAS - 2).astype(int)
        for y, x in zip(ys, xs, strict=True):  # 3x3 dots: a pixel of a 64 px canvas would vanish at 20 px
            ink[y - 1 : y + 2, x - 1 : x + 2] = rng.uniform(0.4, 1)
    return ink


def shadow(rng: np.random.Generator) -> np.ndarray:
    """A blank page with a soft shadow (a hand, a phone) as the service sees it: dark paper becomes ink."""
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32) / CANVAS
    cy, cx = rng.uniform(0.2, 1.2, 2)
    sy, sx = rng.uniform(0.2, 0.6, 2)
    a = rng.uniform(0, math.pi)
    u = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)
    v = -(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a)
    darkness = np.exp(-((u / sx) ** 2 + (v / sy) ** 2))
    vignette = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * rng.uniform(0, 0.6)
    paper_noise = rng.normal(0, 0.02, darkness.shape)
    return np.clip(rng.uniform(0.3, 0.8) * darkness + vignette + paper_noise, 0, 1).astype(np.float32)


def gradient(rng: np.random.Generator) -> np.ndarray:
    """Photo-like shading: a linear or radial ramp with low-frequency texture and sensor noise."""
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32) / CANVAS
    if rng.random() < 0.5:
        a = rng.uniform(0, 2 * math.pi)
        ramp = (xx - 0.5) * math.cos(a) + (yy - 0.5) * math.sin(a) + 0.5
    else:
        cy, cx = rng.uniform(0, 1, 2)
        ramp = 1 - np.hypot(yy - cy, xx - cx)
    texture = np.asarray(
        Image.fromarray(rng.random((8, 8)).astype(np.float32), mode="F").resize(
            (CANVAS, CANVAS), Image.Resampling.BICUBIC
        )
    )
    return np.clip(ramp * 0.7 + texture * 0.3 + rng.normal(0, 0.03, ramp.shape), 0, 1).astype(np.float32)


def _generate(families: dict[str, tuple[Callable, float]], count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    names = list(families)
    weights = np.array([weight for _, weight in families.values()])
    kinds = rng.choice(len(names), size=count, p=weights / weights.sum())
    images = np.empty((count, MNIST_SIDE, MNIST_SIDE), dtype=np.uint8)
    for i, kind in enumerate(kinds):
        images[i] = draw(families[names[kind]][0], rng)
    return images, kinds


def draw(make: Callable[[np.random.Generator], np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """One image of generator `make` in MNIST's format, drawn again while empty (e.g. a blob thresholded away)."""
    image = to_mnist(make(rng))
    while not image.any():
        image = to_mnist(make(rng))
    return image


def training_families(drawn_shapes: bool = True) -> dict[str, tuple[Callable, float]]:
    """Name -> (generator, share of the set); `drawn_shapes=False` leaves the hand-drawn shapes out (ablation)."""
    fonts = _fonts(TRAINING_FACES)
    families = {
        "letters": (_text(LETTERS, fonts, slant=0.15), 3),
        "symbols": (_text(SYMBOLS, fonts, slant=0.15), 1),
        "polygons": (polygon, 1),
        "stars": (star, 1),
        "crosses": (cross, 1),
        "zigzags": (zigzag, 1),
        "scribbles": (scribble, 1),
        "hatching": (hatching, 1),
        "specks": (specks, 1),
        "blobs": (blob, 1),
        # Faces, circled marks, stars, arrows, ticks, crosses, hearts...: what people draw to test a digit reader.
        # The held-out shapes of `evaluate --ood` come from the same generator with another seed (training/shapes.py).
        "drawn shapes": (_drawn_shape, 4),
    }
    if not drawn_shapes:
        del families["drawn shapes"]
    return families


def _drawn_shape(rng: np.random.Generator) -> np.ndarray:
    from training.shapes import random_shape  # shapes.py draws with this module's helpers

    return random_shape(rng)


def held_out_families() -> dict[str, tuple[Callable, float]]:
    """Name -> (generator, share of the set): equal shares."""
    fonts = _fonts(HELD_OUT_FACES)
    return {
        "letters (other faces)": (_text(LETTERS, fonts, slant=0.35), 1),
        "smileys": (smiley, 1),
        "hearts": (heart, 1),
        "spirals": (spiral, 1),
        "arrows": (arrow, 1),
        "houses": (house, 1),
        "clustered specks": (clustered_specks, 1),
        "shadowed blank pages": (shadow, 1),
        "photo-like gradients": (gradient, 1),
    }


def touching_pairs(digits: np.ndarray, count: int, seed: int) -> np.ndarray:
    """uint8 [count, 28, 28]: two of `digits` (uint8 [N, 28, 28], MNIST *training* digits) side by side, touching
    or overlapping a little, made into one MNIST image as the service would make a glyph it found whole.

    Two digits that touch are one blob of ink to the segmenter, so /read asks the model about the blob whole and
    about its cuts. Trained on plain digits only, the model reads a squeezed "13" as a 3 with full confidence and
    the whole wins; taught that such a blob is no single digit, it spreads its probability and the cut wins.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((count, MNIST_SIDE, MNIST_SIDE), dtype=np.uint8)
    for i in range(count):
        inks = []
        for k in rng.integers(len(digits), size=2):
            ink = digits[k].astype(np.float32) / 255.0
            rows, cols = np.flatnonzero(ink.max(axis=1) > 0.05), np.flatnonzero(ink.max(axis=0) > 0.05)
            ink = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
            scale = rng.uniform(0.85, 1.15)  # the digits of one number differ in size a little
            size = (max(1, round(ink.shape[1] * scale)), max(1, round(ink.shape[0] * scale)))
            inks.append(np.asarray(Image.fromarray(ink, mode="F").resize(size, Image.Resampling.BILINEAR)))
        height = max(a.shape[0] for a in inks)
        # From just touching to overlapping by up to 15% of the height, but never by more than a third of the
        # narrower digit: a 1 drawn over most of its neighbour is that neighbour with a stroke, not a pair.
        # A little off the common baseline, as handwriting is.
        narrower = min(a.shape[1] for a in inks)
        overlap = min(round(rng.uniform(0.0, 0.15) * height), narrower // 3)
        drop = [round(rng.uniform(0.0, 0.1) * height) for _ in inks]
        width = inks[0].shape[1] + inks[1].shape[1] - overlap
        row = np.zeros((height + max(drop), width), np.float32)
        for ink, left, down in zip(inks, (0, width - inks[1].shape[1]), drop, strict=True):
            top = height - ink.shape[0] + down
            area = row[top : top + ink.shape[0], left : left + ink.shape[1]]
            np.maximum(area, ink, out=area)
        out[i] = to_mnist(np.clip(row, 0, 1))
    return out


def training_outliers(count: int, seed: int, drawn_shapes: bool = True) -> np.ndarray:
    """uint8 [count, 28, 28] non-digits from the training families (outlier exposure; validation uses another
    seed)."""
    return _generate(training_families(drawn_shapes), count, seed)[0]


def held_out_outliers(count: int = 4500, seed: int = 12345) -> tuple[np.ndarray, list[str]]:
    """uint8 [count, 28, 28] non-digits from the held-out families, and each image's family name."""
    families = held_out_families()
    images, kinds = _generate(families, count, seed)
    names = list(families)
    return images, [names[k] for k in kinds]

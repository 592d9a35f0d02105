"""Drawn shapes: what people draw on a canvas or on paper to test a digit reader, in MNIST's format.

Faces, circles with something inside, stars, arrows, ticks, crosses, hearts, suns, clouds, flowers, squares
and triangles with a mark in them, drawn the way a hand draws them: pen strokes that wobble, at widths from a fine
pen to a thick marker (on the 64 px drawing canvas 2-14 px, i.e. up to ~4x MNIST's stroke once shrunk to 20x20),
either on a canvas (clean anti-aliased ink, as the browser page sends) or on paper (ink whose darkness varies
along the stroke, softened by the camera, as a photo of a pen drawing looks after the service's preprocessing).

One generator, two uses kept apart by seed: outlier exposure draws shapes with the training run's random stream
(training/outliers.py, seeded by the run's seed), the held-out set (`evaluate --ood`) from `HELD_OUT_SEED`, so the
evaluation measures shapes the model never saw, drawn by the same hands.

Nothing here is a digit in any usual hand: no bare circle (0), no circle crossed by one stroke (a slashed 0), no
single stroke (1, 7), no lightning bolt (4, 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from training.outliers import CANVAS, MNIST_SIDE, draw

HELD_OUT_SEED = 7_777_777

Point = tuple[float, float]
Stroke = list[Point]


class Pen:
    """One drawing's hand: stroke width, tremor, and canvas or paper."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        # Widths in canvas pixels, fine pen to thick marker; thin strokes are the common case.
        self.width = float(rng.choice([rng.uniform(2, 5), rng.uniform(5, 9), rng.uniform(9, 14)], p=[0.45, 0.35, 0.2]))
        self.tremor = rng.uniform(0.0, 1.6)
        self.paper = bool(rng.random() < 0.5)
        self.image = Image.new("L", (CANVAS, CANVAS), 0)
        self.draw = ImageDraw.Draw(self.image)

    def stroke(self, points: Stroke, closed: bool = False) -> None:
        """One pen stroke through `points`, resampled every ~1.5 px, wobbling, with round ends."""
        pts = np.asarray([*points, points[0]] if closed else points, dtype=np.float64)
        if len(pts) == 1:
            pts = np.vstack([pts, pts + 0.01])
        steps = np.hypot(*np.diff(pts, axis=0).T)
        length = float(steps.sum())
        n = max(2, int(length / 1.5))
        at = np.concatenate([[0.0], np.cumsum(steps)])
        t = np.linspace(0, length, n)
        xy = np.stack([np.interp(t, at, pts[:, 0]), np.interp(t, at, pts[:, 1])], axis=1)
        # Tremor: smooth low-frequency displacement (a few control points), not pixel noise.
        knots = max(2, int(length / 12))
        for axis in (0, 1):
            control = self.rng.normal(0, self.tremor, knots)
            xy[:, axis] += np.interp(t, np.linspace(0, length, knots), control)
        pressure = np.interp(t, np.linspace(0, length, max(2, knots)), self.rng.uniform(0.75, 1.15, max(2, knots)))
        ink = 255 if not self.paper else int(self.rng.uniform(150, 255))
        for (x0, y0), (x1, y1), p in zip(xy[:-1], xy[1:], pressure[1:], strict=True):
            w = max(1.0, self.width * p)
            self.draw.line([(x0, y0), (x1, y1)], fill=ink, width=max(1, round(w)))
            r = w / 2
            self.draw.ellipse([x1 - r, y1 - r, x1 + r, y1 + r], fill=ink)
        x, y = xy[0]
        r = self.width / 2
        self.draw.ellipse([x - r, y - r, x + r, y + r], fill=ink)

    def dot(self, x: float, y: float, radius: float) -> None:
        r = max(radius, self.width / 2)
        self.draw.ellipse([x - r, y - r, x + r, y + r], fill=255)

    def ink(self) -> np.ndarray:
        image = self.image.rotate(self.rng.uniform(-20, 20), resample=Image.Resampling.BILINEAR)
        if self.paper:  # a photo of paper: softened by the lens, ink darkness uneven
            image = image.filter(ImageFilter.GaussianBlur(self.rng.uniform(0.4, 1.4)))
            shade = np.asarray(
                Image.fromarray(self.rng.uniform(0.6, 1.0, (4, 4)).astype(np.float32), mode="F").resize(
                    (CANVAS, CANVAS), Image.Resampling.BICUBIC
                )
            )
            return np.clip(np.asarray(image, np.float32) / 255.0 * shade, 0, 1)
        return np.asarray(image, np.float32) / 255.0


def _ellipse(cx: float, cy: float, rx: float, ry: float, start: float = 0.0, end: float = 2 * math.pi) -> Stroke:
    t = np.linspace(start, end, 48)
    return list(zip(cx + rx * np.cos(t), cy + ry * np.sin(t), strict=True))


def _ring(pen: Pen, rng: np.random.Generator) -> tuple[float, float, float]:
    """A hand-drawn circle: a little elliptic, its ends overlapping or leaving a gap. Returns centre and radius."""
    r = rng.uniform(20, 28)
    rx, ry = r * rng.uniform(0.85, 1.1), r * rng.uniform(0.85, 1.1)
    start = rng.uniform(0, 2 * math.pi)
    pen.stroke(_ellipse(32, 32, rx, ry, start, start + 2 * math.pi + rng.uniform(-0.15, 0.3)))
    return 32.0, 32.0, min(rx, ry)


def face(rng: np.random.Generator) -> np.ndarray:
    pen = Pen(rng)
    cx, cy, r = _ring(pen, rng)
    eye_y = cy - r * rng.uniform(0.25, 0.4)
    for ex in (cx - r * 0.38, cx + r * 0.38):
        if rng.random() < 0.6:
            pen.dot(ex + rng.normal(0, 1), eye_y + rng.normal(0, 1), rng.uniform(1.5, 3.5))
        else:  # eyes as short strokes
            pen.stroke([(ex, eye_y - r * 0.12), (ex + rng.normal(0, 1), eye_y + r * 0.12)])
    mouth = r * rng.uniform(0.4, 0.6)
    my = cy + r * rng.uniform(0.2, 0.4)
    kind = rng.random()
    if kind < 0.7:  # smile
        pen.stroke(_ellipse(cx, my - mouth * 0.5, mouth, mouth * 0.6, 0.2, math.pi - 0.2))
    elif kind < 0.85:  # frown
        pen.stroke(_ellipse(cx, my + mouth * 0.4, mouth, mouth * 0.5, math.pi + 0.2, 2 * math.pi - 0.2))
    else:  # straight
        pen.stroke([(cx - mouth, my), (cx + mouth, my)])
    return pen.ink()


def circled(rng: np.random.Generator) -> np.ndarray:
    """A circle with something inside that does not touch it: a dot, a cross, a ring, a spiral, a star, a tick."""
    pen = Pen(rng)
    cx, cy, r = _ring(pen, rng)
    inner = r * rng.uniform(0.3, 0.5)
    kind = int(rng.integers(6))
    if kind == 0:
        pen.dot(cx, cy, rng.uniform(2, 5))
    elif kind == 1:
        pen.stroke([(cx - inner, cy - inner), (cx + inner, cy + inner)])
        pen.stroke([(cx + inner, cy - inner), (cx - inner, cy + inner)])
    elif kind == 2:
        pen.stroke(_ellipse(cx, cy, inner, inner))
    elif kind == 3:
        t = np.linspace(0, 2.5 * 2 * math.pi, 80)
        pen.stroke(list(zip(cx + inner * t / t[-1] * np.cos(t), cy + inner * t / t[-1] * np.sin(t), strict=True)))
    elif kind == 4:
        pen.stroke(_star(cx, cy, inner, rng), closed=True)
    else:
        pen.stroke([(cx - inner, cy), (cx - inner * 0.2, cy + inner * 0.7), (cx + inner, cy - inner)])
    return pen.ink()


def _star(cx: float, cy: float, r: float, rng: np.random.Generator) -> Stroke:
    n = int(rng.choice([5, 5, 6]))
    start = rng.uniform(0, 2 * math.pi)
    if rng.random() < 0.5 and n == 5:  # the one-stroke pentagram
        angles = [start + 4 * math.pi * k / 5 for k in range(5)]
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
    inner = r * rng.uniform(0.35, 0.5)
    pts = []
    for k in range(2 * n):
        rr = r if k % 2 == 0 else inner
        a = start + math.pi * k / n
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def star(rng: np.random.Generator) -> np.ndarray:
    pen = Pen(rng)
    pen.stroke(_star(32, 32, rng.uniform(22, 29), rng), closed=True)
    return pen.ink()


def arrow(rng: np.random.Generator) -> np.ndarray:
    pen = Pen(rng)
    if rng.random() < 0.7:
        shaft = [(8.0, 32.0), (56.0, 32.0 + rng.normal(0, 2))]
    else:  # a curved arrow
        shaft = _ellipse(32, 44, 24, 18, math.pi + 0.2, 2 * math.pi - 0.2)
    pen.stroke(shaft)
    (x0, y0), (x1, y1) = shaft[-2], shaft[-1]
    a = math.atan2(y1 - y0, x1 - x0)
    head, spread = rng.uniform(10, 16), rng.uniform(0.45, 0.7)
    left = (x1 - head * math.cos(a - spread), y1 - head * math.sin(a - spread))
    right = (x1 - head * math.cos(a + spread), y1 - head * math.sin(a + spread))
    if rng.random() < 0.5:
        pen.stroke([left, (x1, y1), right])
    else:
        pen.stroke([left, (x1, y1)])
        pen.stroke([right, (x1, y1)])
    pen.image = pen.image.rotate(rng.uniform(0, 360), resample=Image.Resampling.BILINEAR)  # any direction
    return pen.ink()


def tick(rng: np.random.Generator) -> np.ndarray:
    pen = Pen(rng)
    low = (rng.uniform(24, 30), rng.uniform(48, 54))
    pen.stroke([(rng.uniform(8, 14), rng.uniform(30, 38)), low, (rng.uniform(52, 58), rng.uniform(8, 16))])
    return pen.ink()


def cross(rng: np.random.Generator) -> np.ndarray:
    """An X or a plus, two strokes of similar length (a t or a 4 has one short)."""
    pen = Pen(rng)
    a = rng.choice([math.pi / 4, 0.0]) + rng.normal(0, 0.12)
    for b in (a, a + math.pi / 2 + rng.normal(0, 0.1)):
        d = rng.uniform(20, 27)
        pen.stroke([(32 - d * math.cos(b), 32 - d * math.sin(b)), (32 + d * math.cos(b), 32 + d * math.sin(b))])
    return pen.ink()


def heart(rng: np.random.Generator) -> np.ndarray:
    pen = Pen(rng)
    t = np.linspace(0, 2 * math.pi, 60)
    s = rng.uniform(1.3, 1.75)
    x = 32 + s * 16 * np.sin(t) ** 3
    y = 32 - s * (13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pen.stroke(list(zip(x, y, strict=True)))
    return pen.ink()


def sun(rng: np.random.Generator) -> np.ndarray:
    pen = Pen(rng)
    r = rng.uniform(9, 14)
    pen.stroke(_ellipse(32, 32, r, r))
    n = int(rng.integers(6, 11))
    for k in range(n):
        a = 2 * math.pi * k / n + rng.normal(0, 0.08)
        pen.stroke(
            [(32 + (r + 5) * math.cos(a), 32 + (r + 5) * math.sin(a)), (32 + 29 * math.cos(a), 32 + 29 * math.sin(a))]
        )
    return pen.ink()


def flower(rng: np.random.Generator) -> np.ndarray:
    pen = Pen(rng)
    n, r = int(rng.integers(5, 8)), rng.uniform(5, 7)
    pen.dot(32, 32, r * 0.6)
    for k in range(n):
        a = 2 * math.pi * k / n
        cx, cy = 32 + (r + 10) * math.cos(a), 32 + (r + 10) * math.sin(a)
        pen.stroke(_petal(cx, cy, a))
    return pen.ink()


def _petal(cx: float, cy: float, a: float) -> Stroke:
    t = np.linspace(0, 2 * math.pi, 30)
    u, v = 11 * np.cos(t), 6 * np.sin(t)
    return list(zip(cx + u * math.cos(a) - v * math.sin(a), cy + u * math.sin(a) + v * math.cos(a), strict=True))


def cloud(rng: np.random.Generator) -> np.ndarray:
    pen = Pen(rng)
    bumps = int(rng.integers(3, 6))
    xs = np.linspace(14, 50, bumps)
    pts: Stroke = []
    for x in xs:  # the top: a row of arcs
        r = 36 / bumps / 2 + rng.uniform(1, 4)
        pts += _ellipse(x, 30, r, r * rng.uniform(0.8, 1.3), math.pi, 2 * math.pi)
    bottom = rng.uniform(40, 48)  # a flat or a gently rounded underside
    pts += _ellipse(32, bottom - 8, 20, 8 + rng.uniform(0, 6), 0.15, math.pi - 0.15)
    pen.stroke(pts, closed=True)
    return pen.ink()


def marked_box(rng: np.random.Generator) -> np.ndarray:
    """A square or a triangle with a mark inside: a tick, a cross or a dot (a ticked checkbox)."""
    pen = Pen(rng)
    s = rng.uniform(20, 27)
    if rng.random() < 0.6:
        box = [(32 - s, 32 - s), (32 + s, 32 - s), (32 + s, 32 + s), (32 - s, 32 + s)]
    else:
        box = [(32, 32 - s), (32 + s, 32 + s * 0.8), (32 - s, 32 + s * 0.8)]
    pen.stroke([(x + rng.normal(0, 1.5), y + rng.normal(0, 1.5)) for x, y in box], closed=True)
    m = s * 0.4
    kind = int(rng.integers(3))
    if kind == 0:
        pen.stroke([(32 - m, 32 + 2), (32 - m * 0.2, 32 + m), (32 + m, 32 - m)])
    elif kind == 1:
        pen.stroke([(32 - m, 32 - m + 4), (32 + m, 32 + m)])
        pen.stroke([(32 + m, 32 - m + 4), (32 - m, 32 + m)])
    else:
        pen.dot(32, 36, rng.uniform(2, 4))
    return pen.ink()


FAMILIES: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "faces": face,
    "circled marks": circled,
    "stars": star,
    "arrows": arrow,
    "ticks": tick,
    "crosses": cross,
    "hearts": heart,
    "suns": sun,
    "flowers": flower,
    "clouds": cloud,
    "marked boxes": marked_box,
}


def random_shape(rng: np.random.Generator) -> np.ndarray:
    """Canvas ink of one drawn shape of a family picked at random (outlier exposure's generator)."""
    return FAMILIES[list(FAMILIES)[int(rng.integers(len(FAMILIES)))]](rng)


def drawn_shapes(count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """uint8 [count, 28, 28] drawn shapes in MNIST's format, equal shares of every family, and each one's family."""
    rng = np.random.default_rng(seed)
    names = list(FAMILIES)
    kinds = rng.integers(len(names), size=count)
    images = np.empty((count, MNIST_SIDE, MNIST_SIDE), dtype=np.uint8)
    for i, kind in enumerate(kinds):
        images[i] = draw(FAMILIES[names[kind]], rng)
    return images, [names[k] for k in kinds]


def held_out_shapes(count: int = 2200) -> tuple[np.ndarray, list[str]]:
    """The evaluation's drawn shapes: never drawn for training (another seed)."""
    return drawn_shapes(count, HELD_OUT_SEED)

"""How much preprocessing matters: a model's accuracy on realistic uploads, naive pipeline vs ours.

MNIST *test* digits are rendered the way people actually send digits, one family of uploads at a time:

- the everyday ones: dark pen on white or tinted paper at 200-400 px with margins and off-centre, canvas
  exports with the ink only in alpha, JPEGs, noisy photos with mild uneven light, a dark-mode canvas, fine pens;
- the hard ones: 800x600 phone photos with one corner 20-60% darker (a soft falloff or a hard-edged shadow),
  ruled and squared paper with dark lines through the digit, a stray line (margin line, a ruled line, a short
  stroke away from the digit), thick marker strokes, digits rotated 15 and 30 degrees, and low-resolution scans
  (the digit reduced to 8x8 pixels with 16 grey levels, as UCI's optdigits and scikit-learn's digits store
  handwriting, blown up, printed on paper and scanned on a flatbed at low resolution);
- uploads that must be refused: several digits side by side (422, "use /read") and pages with no digit at all,
  only a shadow or lines (400, "no digit found").

Each is classified by an ONNX model after (a) the tutorial pipeline ``convert("L").resize((28, 28))``, inverted when
mostly light, (b) ``service/preprocess.py`` as it was before the robustness work (read from git, ``--baseline``),
and (c) ``service.imaging.preprocess.preprocess`` as it is now. The untouched 28x28 digits give the model's own
accuracy.

    .venv/bin/python benchmarks/preprocess_accuracy.py [--model exported/mnist-cnn.onnx] [--per-family 250]
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFilter

from service.imaging.preprocess import preprocess
from training.data import load_arrays

REPO = Path(__file__).resolve().parent.parent
LIMITS = {"max_bytes": 10_000_000, "max_pixels": 25_000_000}
# The last commit before the preprocessing robustness work (issue "Preprocessing that survives real photos").
BASELINE = "5a6f49f"
EVERYDAY = ("pen-png", "tinted-jpeg", "canvas-alpha", "photo-jpeg", "textured-png", "dark-canvas", "fine-pen")
HARD = ("shadow", "ruled", "squared", "stray-line", "thick-marker", "rotate-15", "rotate-30")
# Families whose right answer is a refusal, and its status.
REFUSED = {"multi-digit": 422, "no-digit": 400}
# Each family's random stream is seeded by its index here, so a family added later goes last: the others keep
# their uploads, and their figures stay comparable with earlier runs.
LATER = ("low-res-scan",)
FAMILIES = (*EVERYDAY, *HARD, *REFUSED, *LATER)
PEN_COLOURS = ((20.0, 20.0, 20.0), (25.0, 35.0, 120.0), (150.0, 30.0, 30.0))


def _ink(digit: np.ndarray, height: int, rng: np.random.Generator, fine: bool = False) -> np.ndarray:
    """The digit as a smooth ink-coverage map in [0, 1], `height` px tall (strokes a little bolder/finer)."""
    size = (height, height)
    big = np.asarray(Image.fromarray(digit).resize(size, Image.Resampling.BICUBIC), dtype=np.float32) / 255
    # A pen gives solid strokes with soft edges, not an upscaled blur: steepen the ramp, shift the edge
    # (a fine pen: keep only the cores of MNIST's strokes, about half their width).
    edge = rng.uniform(0.75, 0.85) if fine else rng.uniform(0.25, 0.55)
    width = 0.1 if fine else 0.25
    return np.clip((big - edge) / width + 0.5, 0.0, 1.0)


def _marker(digit: np.ndarray, height: int, rng: np.random.Generator) -> np.ndarray:
    """A thick marker: MNIST's strokes widened by 4-8% of the digit's height (about twice MNIST's width; more
    fills the loops of bold digits completely, and nobody can read those)."""
    ink = _ink(digit, height, rng)
    radius = max(1, round(rng.uniform(0.02, 0.04) * height))
    image = Image.fromarray(np.rint(ink * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(2 * radius + 1))
    # A round nib: blurring rounds the square filter's corners and softens the edge as felt does.
    return np.asarray(image.filter(ImageFilter.GaussianBlur(radius / 3)), dtype=np.float32) / 255


def _low_res(digit: np.ndarray, height: int, rng: np.random.Generator) -> np.ndarray:
    """The digit cut to its box, reduced to 8x8 with 16 grey levels (the digit filling the grid, as optdigits'
    are), then blown up to `height` px for printing: blocky (nearest) or smoothed by the viewer (bilinear)."""
    ink = digit.astype(np.float32) / 255
    rows, cols = np.flatnonzero(ink.max(axis=1) > 0.1), np.flatnonzero(ink.max(axis=0) > 0.1)
    ink = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    side = max(ink.shape) + 2
    square = np.zeros((side, side), np.float32)
    top, left = (side - ink.shape[0]) // 2, (side - ink.shape[1]) // 2
    square[top : top + ink.shape[0], left : left + ink.shape[1]] = ink
    grid = np.asarray(Image.fromarray(square, "F").resize((8, 8), Image.Resampling.BOX), dtype=np.float32)
    grid = np.round(np.clip(grid / max(float(grid.max()), 1e-6), 0, 1) * 15) / 15
    blow_up = Image.Resampling.NEAREST if rng.random() < 0.6 else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(grid, "F").resize((height, height), blow_up), dtype=np.float32)


def _scan(rgb: np.ndarray, rng: np.random.Generator) -> bytes:
    """A flatbed scan at low resolution: even light, the optics' blur, 1.5-3x fewer pixels, faint noise."""
    image = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    factor = rng.uniform(1.5, 3.0)
    image = image.resize((round(image.width / factor), round(image.height / factor)), Image.Resampling.BILINEAR)
    noisy = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(1, 3), (image.height, image.width, 3))
    image = Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")
    return _encode(image, "PNG") if rng.random() < 0.5 else _encode(image, "JPEG", quality=int(rng.integers(70, 95)))


def _rotated(ink: np.ndarray, degrees: float) -> np.ndarray:
    side = ink.shape[0]
    pad = side // 3
    image = Image.fromarray(np.pad(ink, pad), "F").rotate(degrees, Image.Resampling.BILINEAR)
    rotated = np.asarray(image, dtype=np.float32)
    rows, cols = np.flatnonzero(rotated.max(axis=1) > 0.05), np.flatnonzero(rotated.max(axis=0) > 0.05)
    return rotated[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _place(ink: np.ndarray, rng: np.random.Generator, side_range: tuple[int, int]) -> tuple[np.ndarray, tuple]:
    """Put the ink map on a larger canvas at a random spot, keeping a margin of at least 5%."""
    h, w = ink.shape
    height = max(int(rng.integers(*side_range)), int(h * 1.15) + 2)
    width = max(int(rng.integers(*side_range)), int(w * 1.15) + 2)
    return _put(ink, rng, height, width)


def _put(ink: np.ndarray, rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, tuple]:
    h, w = ink.shape
    top = int(rng.integers(height // 20, height - h - height // 20 + 1))
    left = int(rng.integers(width // 20, width - w - width // 20 + 1))
    canvas = np.zeros((height, width), np.float32)
    canvas[top : top + h, left : left + w] = ink
    return canvas, (top, left, h, w)


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def _paper(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    paper = np.array([rng.uniform(225, 250), rng.uniform(220, 245), rng.uniform(195, 235)], np.float32)
    return np.broadcast_to(paper, (*shape, 3)).copy()


def _lay(rgb: np.ndarray, coverage: np.ndarray, colour: tuple[float, ...]) -> np.ndarray:
    """Ink of `colour` over the page, `coverage` in [0, 1] per pixel."""
    return rgb * (1 - coverage[..., None]) + np.asarray(colour, np.float32) * coverage[..., None]


def _photo(rgb: np.ndarray, rng: np.random.Generator, light: np.ndarray | None = None, jpeg: bool = True) -> bytes:
    """Lighting, sensor noise, lens blur and JPEG, as a phone adds them."""
    if light is not None:
        rgb = rgb * light[..., None]
    rgb = rgb + rng.normal(0, rng.uniform(2, 6), rgb.shape)
    image = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    if not jpeg:
        return _encode(image, "PNG")
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return _encode(image, "JPEG", quality=int(rng.integers(55, 90)))


def _shadow(shape: tuple[int, int], rng: np.random.Generator, depth: float) -> np.ndarray:
    """Light falling off towards one corner, `depth` darker there: a soft gradient or a hard-edged shadow."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    corner_y, corner_x = (0, shape[0])[rng.integers(2)], (0, shape[1])[rng.integers(2)]
    diagonal = float(np.hypot(*shape))
    distance = np.hypot(yy - corner_y, xx - corner_x) / diagonal
    if rng.random() < 0.5:
        reach = rng.uniform(0.4, 0.9)
        falloff = np.clip(1 - distance / reach, 0, 1) ** rng.uniform(1.0, 2.0)
    else:
        # A hand's or a phone's shadow: a straight edge across the corner, blurred by the penumbra.
        edge = rng.uniform(0.2, 0.45)
        softness = rng.uniform(0.01, 0.05)
        falloff = np.clip((edge - distance) / softness + 0.5, 0, 1)
    return 1.0 - depth * falloff


def _lines(shape: tuple[int, int], positions: np.ndarray, thickness: float, axis: int, tilt: float) -> np.ndarray:
    """Coverage of straight lines across the page at `positions` (rows for axis 0, columns for axis 1)."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    along, across = (xx, yy) if axis == 0 else (yy, xx)
    across = across - np.tan(np.radians(tilt)) * along
    nearest = np.min(np.abs(across[..., None] - positions.astype(np.float32)), axis=-1)
    return np.clip(thickness / 2 + 0.5 - nearest, 0, 1)


def render(digit: np.ndarray, family: str, rng: np.random.Generator, pool: np.ndarray) -> bytes:
    """One MNIST digit (uint8 28x28, white on black) as the file a user might upload in this family.

    `pool` holds other test digits, for pages with several digits.
    """
    if family in EVERYDAY:
        return _everyday(digit, family, rng)
    pen = PEN_COLOURS[int(rng.integers(len(PEN_COLOURS)))]
    if family == "shadow":
        shape = (600, 800) if rng.random() < 0.5 else (800, 600)
        ink, _ = _put(_ink(digit, int(rng.integers(80, 250)), rng), rng, *shape)
        return _photo(_lay(_paper(shape, rng), ink, pen), rng, _shadow(shape, rng, rng.uniform(0.2, 0.6)))
    if family in ("ruled", "squared"):
        height = int(rng.integers(60, 200))
        ink, _ = _place(_ink(digit, height, rng), rng, (300, 500))
        spacing = height * rng.uniform(0.5, 1.0) if family == "ruled" else height * rng.uniform(0.25, 0.5)
        thickness, tilt = rng.uniform(1.0, 3.0), rng.uniform(-0.5, 0.5)
        lines = _lines(ink.shape, np.arange(rng.uniform(0, spacing), ink.shape[0], spacing), thickness, 0, tilt)
        if family == "squared":
            columns = np.arange(rng.uniform(0, spacing), ink.shape[1], spacing)
            lines = np.maximum(lines, _lines(ink.shape, columns, thickness, 1, tilt))
        darkness = rng.uniform(60, 150)
        line_colour = (darkness, darkness + 15, min(255.0, darkness + 60))
        rgb = _lay(_lay(_paper(ink.shape, rng), lines, line_colour), ink, pen)
        return _photo(rgb, rng, jpeg=rng.random() < 0.5)
    if family == "stray-line":
        height = int(rng.integers(60, 200))
        ink, box = _place(_ink(digit, height, rng), rng, (300, 500))
        return _photo(_lay(_lay(_paper(ink.shape, rng), _stray(ink.shape, box, rng), pen), ink, pen), rng)
    if family == "thick-marker":
        ink, _ = _place(_marker(digit, int(rng.integers(60, 200)), rng), rng, (200, 400))
        return _photo(_lay(_paper(ink.shape, rng), ink, pen), rng, jpeg=rng.random() < 0.5)
    if family == "low-res-scan":
        printed, _ = _place(_low_res(digit, int(rng.integers(60, 200)), rng), rng, (200, 400))
        return _scan(_lay(_paper(printed.shape, rng), printed, (30.0, 30.0, 30.0)), rng)
    if family.startswith("rotate-"):
        degrees = float(family.split("-")[1]) * (1 if rng.random() < 0.5 else -1)
        ink, _ = _place(_rotated(_ink(digit, int(rng.integers(60, 200)), rng), degrees), rng, (200, 400))
        return _photo(_lay(_paper(ink.shape, rng), ink, pen), rng, jpeg=rng.random() < 0.5)
    if family == "multi-digit":
        count = int(rng.integers(2, 5))
        others = pool[rng.choice(len(pool), size=count - 1, replace=False)]
        height = int(rng.integers(50, 120))
        page = _row_of([digit, *others], height, rng)
        return _photo(_lay(_paper(page.shape, rng), page, pen), rng, jpeg=rng.random() < 0.5)
    if family == "no-digit":
        return _no_digit(rng)
    raise ValueError(f"unknown family {family!r}")


def _row_of(digits: list[np.ndarray], height: int, rng: np.random.Generator) -> np.ndarray:
    """The coverage of digits written side by side, separated by gaps of 10-50% of their height."""
    inks = []
    for digit in digits:
        ink = _ink(digit, int(height * rng.uniform(0.85, 1.15)), rng)
        cols = np.flatnonzero(ink.max(axis=0) > 0.05)
        inks.append(ink[:, cols[0] : cols[-1] + 1])
    gaps = [int(height * rng.uniform(0.1, 0.5)) for _ in inks[1:]]
    width = sum(ink.shape[1] for ink in inks) + sum(gaps)
    tallest = max(ink.shape[0] for ink in inks)
    margin = int(height * rng.uniform(0.3, 1.0))
    page = np.zeros((tallest + 2 * margin, width + 2 * margin), np.float32)
    left = margin
    for i, ink in enumerate(inks):
        top = margin + int(rng.integers(0, tallest - ink.shape[0] + 1))
        page[top : top + ink.shape[0], left : left + ink.shape[1]] = ink
        left += ink.shape[1] + (gaps[i] if i < len(gaps) else 0)
    return page


def _stray(shape: tuple[int, int], box: tuple[int, int, int, int], rng: np.random.Generator) -> np.ndarray:
    """A margin line, a ruled line through the page, or a short pen stroke away from the digit."""
    top, left, h, w = box
    kind = rng.integers(3)
    if kind == 0:  # a margin line, left or right of the digit, top to bottom
        x = (
            rng.uniform(0.02, 0.9) * left
            if left > shape[1] - left - w
            else left + w + rng.uniform(0.1, 0.98) * (shape[1] - left - w)
        )
        return _lines(shape, np.array([x]), rng.uniform(1.5, 4.0), 1, rng.uniform(-0.5, 0.5))
    if kind == 1:  # a dark ruled line across the page, anywhere, through the digit too
        return _lines(shape, np.array([rng.uniform(0.05, 0.95) * shape[0]]), rng.uniform(1.5, 4.0), 0, 0.0)
    # A short stroke of 20-50% of the digit's height, at least a third of the digit's height away from it.
    image = Image.new("L", (shape[1], shape[0]), 0)
    length = rng.uniform(0.2, 0.5) * h
    for _ in range(100):
        x, y = rng.uniform(0, shape[1]), rng.uniform(0, shape[0])
        angle = rng.uniform(0, np.pi)
        x2, y2 = x + length * np.cos(angle), y + length * np.sin(angle)
        inside = 0 <= x2 < shape[1] and 0 <= y2 < shape[0]
        gap = h / 3
        clear_x = max(x, x2) < left - gap or min(x, x2) > left + w + gap
        clear_y = max(y, y2) < top - gap or min(y, y2) > top + h + gap
        if inside and (clear_x or clear_y):
            ImageDraw.Draw(image).line([(x, y), (x2, y2)], fill=255, width=max(1, round(0.08 * h)))
            break
    return np.asarray(image.filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float32) / 255


def _no_digit(rng: np.random.Generator) -> bytes:
    """A page with nothing written on it: a shadow, one line, or ruled/squared lines."""
    shape = (int(rng.integers(300, 700)), int(rng.integers(300, 800)))
    kind = rng.integers(4)
    rgb = _paper(shape, rng)
    if kind == 0:
        return _photo(rgb, rng, _shadow(shape, rng, rng.uniform(0.2, 0.6)))
    darkness = rng.uniform(40, 150)
    colour = (darkness, darkness + 15, min(255.0, darkness + 60))
    if kind == 1:
        line = _lines(shape, np.array([rng.uniform(0.1, 0.9) * shape[int(rng.integers(2))]]), 3.0, 0, 0.0)
        if rng.random() < 0.5:
            line = _lines(shape, np.array([rng.uniform(0.1, 0.9) * shape[1]]), 3.0, 1, 0.0)
        return _photo(_lay(rgb, line, colour), rng)
    spacing = rng.uniform(25, 60)
    lines = _lines(shape, np.arange(rng.uniform(0, spacing), shape[0], spacing), rng.uniform(1, 3), 0, 0.0)
    if kind == 3:
        lines = np.maximum(lines, _lines(shape, np.arange(rng.uniform(0, spacing), shape[1], spacing), 2.0, 1, 0.0))
    return _photo(_lay(rgb, lines, colour), rng, _shadow(shape, rng, rng.uniform(0.0, 0.4)))


def _everyday(digit: np.ndarray, style: str, rng: np.random.Generator) -> bytes:
    if style == "canvas-alpha":
        # A drawing pad: big digit on a 280-400 px transparent canvas, RGB all black, ink only in alpha.
        ink, _ = _place(_ink(digit, int(rng.integers(150, 260)), rng), rng, (280, 400))
        rgba = np.zeros((*ink.shape, 4), np.uint8)
        rgba[..., 3] = np.rint(ink * 255).astype(np.uint8)
        return _encode(Image.fromarray(rgba, "RGBA"), "PNG")
    if style == "dark-canvas":
        ink, _ = _place(_ink(digit, int(rng.integers(150, 260)), rng), rng, (280, 400))
        gray = 30 + ink * 210
        return _encode(Image.fromarray(np.rint(gray).astype(np.uint8), "L"), "PNG")

    ink, _ = _place(_ink(digit, int(rng.integers(60, 200)), rng, fine=style == "fine-pen"), rng, (200, 400))
    paper = np.array([255.0, 255.0, 255.0], np.float32)
    pen = np.array([20.0, 20.0, 20.0], np.float32) if rng.random() < 0.5 else np.array([25.0, 35.0, 120.0])
    noise, light, texture = 0.0, None, 0.0
    if style in ("tinted-jpeg", "photo-jpeg", "textured-png", "fine-pen"):
        paper = np.array([rng.uniform(225, 250), rng.uniform(220, 245), rng.uniform(195, 235)], np.float32)
        noise = rng.uniform(2, 8)
    if style == "photo-jpeg":
        # Uneven light: a gradient across the page and a vignette, darkening up to ~30%.
        yy, xx = np.mgrid[0 : ink.shape[0], 0 : ink.shape[1]].astype(np.float32)
        yy, xx = yy / ink.shape[0] - 0.5, xx / ink.shape[1] - 0.5
        angle = rng.uniform(0, 2 * np.pi)
        light = 1.0 - 0.15 * (np.cos(angle) * xx + np.sin(angle) * yy + 0.5) - 0.4 * (xx**2 + yy**2)
    if style == "textured-png":
        texture = rng.uniform(6, 15)
    rgb = paper * (1 - ink[..., None]) + pen * ink[..., None]
    if texture:
        grain = rng.normal(0, 1, (ink.shape[0] // 4 + 1, ink.shape[1] // 4 + 1)).astype(np.float32)
        grain = np.asarray(Image.fromarray(grain, "F").resize((ink.shape[1], ink.shape[0]), Image.Resampling.BICUBIC))
        rgb += texture * grain[..., None]
    if light is not None:
        rgb *= light[..., None]
    if noise:
        rgb += rng.normal(0, noise, rgb.shape)
    image = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    if style in ("tinted-jpeg", "photo-jpeg", "fine-pen"):
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
        return _encode(image, "JPEG", quality=int(rng.integers(55, 90)))
    return _encode(image, "PNG")


def naive(data: bytes) -> np.ndarray:
    """What a tutorial does with an upload, plus the usual fix: invert when the picture is mostly light."""
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("L").resize((28, 28)), dtype=np.float32) / 255
    return 1 - pixels if pixels.mean() > 0.5 else pixels


def load_baseline(revision: str) -> types.ModuleType | None:
    """service/preprocess.py as it was at `revision` (from git), or None where git or the revision is missing."""
    try:
        source = subprocess.run(
            ["git", "show", f"{revision}:service/preprocess.py"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"baseline {revision} not available ({exc}); its column is left out", file=sys.stderr)
        return None
    module = types.ModuleType(f"preprocess_{revision}")
    exec(compile(source, f"{revision}:service/preprocess.py", "exec"), module.__dict__)
    return module


def run_pipeline(pipeline: Callable[[bytes], np.ndarray], files: list[bytes]) -> tuple[np.ndarray, list, float]:
    """(pixels, per-file refusal status or None, seconds per image); refused files get blank pixels."""
    pixels = np.zeros((len(files), 28, 28), np.float32)
    refused: list[int | None] = [None] * len(files)
    start = time.perf_counter()
    for i, data in enumerate(files):
        try:
            pixels[i] = pipeline(data)
        except ValueError as exc:  # ImageError of either version of the module
            refused[i] = getattr(exc, "status", 400)
    return pixels, refused, (time.perf_counter() - start) / len(files)


def classify(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    (probabilities,) = session.run(["probabilities"], {"image": batch[:, None].astype(np.float32)})
    return probabilities.argmax(axis=1)


def right_answers(
    session: ort.InferenceSession, family: str, pixels: np.ndarray, refused: list, labels: np.ndarray
) -> np.ndarray:
    """Per upload, whether the answer was right: the refusal's status for multi-digit and no-digit pages, else the
    true digit from an upload that was not refused."""
    if family in REFUSED:
        return np.array([status == REFUSED[family] for status in refused])
    return (classify(session, pixels) == labels) & np.array([status is None for status in refused])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "exported" / "mnist-cnn.onnx", help="ONNX model")
    parser.add_argument("--per-family", type=int, default=250, help="uploads per family (default 250)")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES), help="default: all")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--baseline", default=BASELINE, help=f"git revision of the 'before' column ({BASELINE})")
    parser.add_argument("--data-dir", type=Path, default=None, help="MNIST IDX files (default: data/mnist)")
    parser.add_argument("--save", type=Path, default=None, help="also write the rendered uploads here")
    args = parser.parse_args()

    arrays = load_arrays(args.data_dir)
    test_images, test_labels = arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]
    session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    pipelines: dict[str, Callable[[bytes], np.ndarray]] = {"tutorial": naive}
    baseline = load_baseline(args.baseline)
    if baseline is not None:
        pipelines[f"before ({args.baseline})"] = lambda d: baseline.preprocess(d, **LIMITS)
    pipelines["ours"] = lambda d: preprocess(d, **LIMITS)

    print(f"model {args.model.name}; {args.per_family} uploads per family from MNIST test digits (seed {args.seed})")
    print("right = the true digit; for multi-digit and no-digit pages, the refusal (422 / 400)")
    header = f"{'family':14} {'28x28':>7} " + " ".join(f"{name:>18}" for name in pipelines) + "   ours ms/image"
    print(header)
    totals: dict[str, list[float]] = {name: [] for name in pipelines}
    for family in args.families:
        rng = np.random.default_rng([args.seed, FAMILIES.index(family)])
        pick = rng.choice(len(test_labels), size=args.per_family, replace=False)
        digits, labels = test_images[pick], test_labels[pick]
        files = [render(digit, family, rng, test_images) for digit in digits]
        if args.save:
            folder = args.save / family
            folder.mkdir(parents=True, exist_ok=True)
            for i, data in enumerate(files):
                suffix = "jpg" if data[:2] == b"\xff\xd8" else "png"
                (folder / f"{i:04d}-label{labels[i]}.{suffix}").write_bytes(data)
        ceiling = (classify(session, digits.astype(np.float32) / 255) == labels).mean()
        cells = []
        for name, pipeline in pipelines.items():
            pixels, refused, seconds = run_pipeline(pipeline, files)
            right = right_answers(session, family, pixels, refused, labels)
            totals[name].append(float(right.mean()))
            cells.append(f"{right.mean():18.1%}")
        shown_ceiling = "" if family in REFUSED else f"{ceiling:.1%}"
        print(f"{family:14} {shown_ceiling:>7} " + " ".join(cells) + f"   {seconds * 1e3:10.2f}")
    means = " ".join(f"{np.mean(values):18.1%}" for values in totals.values())
    print(f"{'mean':14} {'':>7} " + means)


if __name__ == "__main__":
    main()

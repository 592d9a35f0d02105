"""How well /read reads whole numbers: pages of several digits, segmented and classified as the service does.

Pages are built from MNIST *test* digits (2-8 per page, gaps of 10-60% of a digit's height, sizes varying by
+-15%, on clean white, tinted paper and photographed pages) and from digits typeset in the DejaVu fonts:

- ``separated``: 2-5 digits with gaps; ``long``: 6-8 digits; ``touching``: 2-5 digits where one pair touches or
  overlaps a little; ``two-rows``: two rows of 2-4 digits; ``fonts``: 2-6 typeset digits, separated.

Each page is read by the service's own ``service.inference.answers.read_number`` (what ``/read`` runs: decoding,
segmentation, one batch through the model, the choice of cuts, the ``MNIST_MAX_DIGITS`` limit), with the service's
default settings and its ONNX Runtime session (``service.inference.runtime``). Printed per family: whole-string
accuracy, the share of pages with the right number of digits, and per-digit accuracy (1 - edit distance / length,
so a missed or extra digit costs one).

    .venv/bin/python benchmarks/read_accuracy.py [--model exported/mnist-cnn.onnx] [--pages 200]
"""

from __future__ import annotations

import argparse
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from benchmarks.preprocess_accuracy import PEN_COLOURS, _ink, _lay, _paper, _photo, _shadow
from service.errors import ClientError
from service.inference.answers import read_number
from service.inference.runtime import Model, load_model
from service.settings import Settings
from training.data import load_arrays

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ("separated", "long", "touching", "two-rows", "fonts")
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")


def _trim(ink: np.ndarray) -> np.ndarray:
    cols = np.flatnonzero(ink.max(axis=0) > 0.05)
    return ink[:, cols[0] : cols[-1] + 1]


def _row(inks: list[np.ndarray], gaps: list[int]) -> np.ndarray:
    """Ink maps side by side (bottom-aligned with a little jitter already in their heights), `gaps` between."""
    tallest = max(ink.shape[0] for ink in inks)
    width = sum(ink.shape[1] for ink in inks) + sum(gaps)
    row = np.zeros((tallest, width), np.float32)
    left = 0
    for i, ink in enumerate(inks):
        top = tallest - ink.shape[0]
        row[top:, left : left + ink.shape[1]] = np.maximum(row[top:, left : left + ink.shape[1]], ink)
        left += ink.shape[1] + (gaps[i] if i < len(gaps) else 0)
    return row


def _font_digit(digit: int, height: int, font: Path) -> np.ndarray:
    face = ImageFont.truetype(str(font), size=height)
    left, top, right, bottom = face.getbbox(str(digit))
    image = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(image).text((2 - left, 2 - top), str(digit), fill=255, font=face)
    return np.asarray(image, dtype=np.float32) / 255


def page(family: str, rng: np.random.Generator, images: np.ndarray, labels: np.ndarray) -> tuple[bytes, str]:
    """One page of this family as an upload, and the text on it (rows separated by newlines)."""
    height = int(rng.integers(50, 110))
    rows_of: list[list[int]]
    if family == "two-rows":
        rows_of = [list(rng.choice(len(labels), size=int(rng.integers(2, 5)))) for _ in range(2)]
    else:
        count = {"separated": (2, 6), "long": (6, 9), "touching": (2, 6), "fonts": (2, 7)}[family]
        rows_of = [list(rng.choice(len(labels), size=int(rng.integers(*count))))]
    fonts = sorted(FONT_DIR.glob("DejaVu*.ttf"))
    font = fonts[int(rng.integers(len(fonts)))] if fonts else None
    rows, texts = [], []
    for picks in rows_of:
        if family == "fonts":
            digits = [int(rng.integers(10)) for _ in picks]
            inks = [_trim(_font_digit(d, int(height * rng.uniform(0.85, 1.15)), font)) for d in digits]
        else:
            digits = [int(labels[i]) for i in picks]
            inks = [_trim(_ink(images[i], int(height * rng.uniform(0.85, 1.15)), rng)) for i in picks]
        gaps = [int(height * rng.uniform(0.1, 0.6)) for _ in inks[1:]]
        if family == "touching" and gaps:
            gaps[int(rng.integers(len(gaps)))] = -int(height * rng.uniform(0.0, 0.08))
        rows.append(_row(inks, gaps))
        texts.append("".join(map(str, digits)))
    line_gap = int(height * rng.uniform(0.3, 0.8))
    width = max(r.shape[1] for r in rows)
    stacked = np.zeros((sum(r.shape[0] for r in rows) + line_gap * (len(rows) - 1), width), np.float32)
    top = 0
    for r in rows:
        stacked[top : top + r.shape[0], : r.shape[1]] = r
        top += r.shape[0] + line_gap
    margin = int(height * rng.uniform(0.3, 1.0))
    ink = np.pad(stacked, margin)
    pen = PEN_COLOURS[int(rng.integers(len(PEN_COLOURS)))]
    background = rng.integers(3)
    if background == 0:  # clean white, PNG
        rgb = np.full((*ink.shape, 3), 255.0, np.float32)
        image = Image.fromarray(np.clip(np.rint(_lay(rgb, ink, pen)), 0, 255).astype(np.uint8), "RGB")
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue(), "\n".join(texts)
    light = _shadow(ink.shape, rng, rng.uniform(0.1, 0.4)) if background == 2 else None
    return _photo(_lay(_paper(ink.shape, rng), ink, pen), rng, light), "\n".join(texts)


def edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def read(model: Model, data: bytes, settings: Settings) -> str:
    """The text /read answers for this page ("" where it answers an error: no digit found, too many digits)."""
    try:
        return read_number(model, data, settings)["text"]
    except ClientError:
        return ""


@dataclass(frozen=True)
class Score:
    """One family's pages read: how many, read whole right, with the right count of digits; edits from the truth
    over its length (per digit: 1 - errors / length); seconds per page."""

    pages: int
    right: int
    counted: int
    errors: int
    length: int
    seconds: float


def measure(
    model: Model,
    family: str,
    digits: tuple[np.ndarray, np.ndarray],
    pages: int,
    seed: int,
    save: Path | None = None,
    settings: Settings | None = None,
) -> Score:
    """Read `pages` pages of `family` built from `digits` (MNIST test images, labels) with `seed`, as /read does
    with `settings` (default: the service's defaults); save them (named by what was on them and what was read)
    under `save` if given."""
    settings = settings or Settings()
    rng = np.random.default_rng([seed, FAMILIES.index(family)])
    made = [page(family, rng, *digits) for _ in range(pages)]
    right = counted = errors = length = 0
    start = time.perf_counter()
    for i, (data, truth) in enumerate(made):
        got = read(model, data, settings)
        right += got == truth
        counted += len(got.replace("\n", "")) == len(truth.replace("\n", ""))
        errors += edit_distance(got, truth)
        length += len(truth)
        if save:
            folder = save / family
            folder.mkdir(parents=True, exist_ok=True)
            suffix = "png" if data[:4] == b"\x89PNG" else "jpg"
            name = f"{i:04d}-{truth.replace(chr(10), '_')}-read-{got.replace(chr(10), '_') or 'none'}.{suffix}"
            (folder / name).write_bytes(data)
    return Score(pages, right, counted, errors, length, (time.perf_counter() - start) / pages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "exported" / "mnist-cnn.onnx", help="ONNX model")
    parser.add_argument("--pages", type=int, default=200, help="pages per family (default 200)")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES), help="default: all")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--data-dir", type=Path, default=None, help="MNIST IDX files (default: data/mnist)")
    parser.add_argument("--save", type=Path, default=None, help="also write the pages here")
    args = parser.parse_args()

    arrays = load_arrays(args.data_dir)
    digits = arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]
    settings = Settings()
    model = load_model(args.model, "cpu", settings.intra_op_threads)  # the service's session, as one worker has it
    print(f"model {args.model.name}; {args.pages} pages per family (seed {args.seed})")
    print(f"{'family':10} {'string':>8} {'count':>8} {'per digit':>10} {'ms/page':>9}")
    all_errors = all_length = 0
    for family in args.families:
        if family == "fonts" and not any(FONT_DIR.glob("DejaVu*.ttf")):
            print(f"{family:10} skipped: no DejaVu fonts in {FONT_DIR}")
            continue
        score = measure(model, family, digits, args.pages, args.seed, args.save, settings)
        n = score.pages
        print(
            f"{family:10} {score.right / n:8.1%} {score.counted / n:8.1%} {1 - score.errors / score.length:10.1%}"
            f" {score.seconds * 1e3:9.2f}"
        )
        all_errors, all_length = all_errors + score.errors, all_length + score.length
    # Every digit of every page read, whatever its family: the per-digit figure of the "per digit >= 98%".
    if all_length:
        print(f"{'all pages':10} {'':8} {'':8} {1 - all_errors / all_length:10.1%}")


if __name__ == "__main__":
    main()

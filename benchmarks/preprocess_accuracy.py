"""How much preprocessing matters: a model's accuracy on realistic uploads, naive pipeline vs ours.

MNIST test digits are rendered the way people actually send digits -- dark pen on white or tinted paper
at 200-400 px with margins and off-centre, canvas exports with the ink only in alpha, JPEGs, noisy photos
with uneven light, the odd dark-mode canvas -- and classified by an ONNX model after
(a) the tutorial pipeline: ``Image.open(f).convert("L").resize((28, 28)) / 255``,
(a') the same, inverted when the result is mostly light, and
(b) ``service.preprocess.preprocess``.
The untouched 28x28 digits are classified too: that is the model's own accuracy, the ceiling.

    .venv/bin/python benchmarks/preprocess_accuracy.py [--model exported/mnist-cnn.onnx] [--count 1000]
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageFilter

from service.preprocess import preprocess
from training.data import load_arrays

REPO = Path(__file__).resolve().parent.parent
LIMITS = {"max_bytes": 10_000_000, "max_pixels": 25_000_000}
STYLES = ("pen-png", "tinted-jpeg", "canvas-alpha", "photo-jpeg", "textured-png", "dark-canvas", "fine-pen")


def _ink(digit: np.ndarray, height: int, rng: np.random.Generator, fine: bool = False) -> np.ndarray:
    """The digit as a smooth ink-coverage map in [0, 1], `height` px tall (strokes a little bolder/finer)."""
    size = (height, height)
    big = np.asarray(Image.fromarray(digit).resize(size, Image.Resampling.BICUBIC), dtype=np.float32) / 255
    # A pen gives solid strokes with soft edges, not an upscaled blur: steepen the ramp, shift the edge
    # (a fine pen: keep only the cores of MNIST's strokes, about half their width).
    edge = rng.uniform(0.75, 0.85) if fine else rng.uniform(0.25, 0.55)
    width = 0.1 if fine else 0.25
    return np.clip((big - edge) / width + 0.5, 0.0, 1.0)


def _place(ink: np.ndarray, rng: np.random.Generator, side_range: tuple[int, int]) -> np.ndarray:
    """Put the ink map on a larger canvas at a random spot, keeping a margin of at least 5%."""
    h = w = ink.shape[0]
    height = max(int(rng.integers(*side_range)), int(h * 1.15) + 2)
    width = max(int(rng.integers(*side_range)), int(w * 1.15) + 2)
    top = int(rng.integers(height // 20, height - h - height // 20 + 1))
    left = int(rng.integers(width // 20, width - w - width // 20 + 1))
    canvas = np.zeros((height, width), np.float32)
    canvas[top : top + h, left : left + w] = ink
    return canvas


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def render(digit: np.ndarray, style: str, rng: np.random.Generator) -> bytes:
    """One MNIST digit (uint8 28x28, white on black) as the file a user might upload."""
    if style == "canvas-alpha":
        # A drawing pad: big digit on a 280-400 px transparent canvas, RGB all black, ink only in alpha.
        ink = _place(_ink(digit, int(rng.integers(150, 260)), rng), rng, (280, 400))
        rgba = np.zeros((*ink.shape, 4), np.uint8)
        rgba[..., 3] = np.rint(ink * 255).astype(np.uint8)
        return _encode(Image.fromarray(rgba, "RGBA"), "PNG")
    if style == "dark-canvas":
        ink = _place(_ink(digit, int(rng.integers(150, 260)), rng), rng, (280, 400))
        gray = 30 + ink * 210
        return _encode(Image.fromarray(np.rint(gray).astype(np.uint8), "L"), "PNG")

    ink = _place(_ink(digit, int(rng.integers(60, 200)), rng, fine=style == "fine-pen"), rng, (200, 400))
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
    """What a tutorial does with an upload."""
    image = Image.open(io.BytesIO(data)).convert("L").resize((28, 28))
    return np.asarray(image, dtype=np.float32) / 255


def naive_inverted(data: bytes) -> np.ndarray:
    """The tutorial pipeline plus the usual fix: invert when the picture is mostly light."""
    pixels = naive(data)
    return 1 - pixels if pixels.mean() > 0.5 else pixels


def classify(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    (probabilities,) = session.run(["probabilities"], {"image": batch[:, None].astype(np.float32)})
    return probabilities.argmax(axis=1)


def run_pipeline(pipeline: Callable[[bytes], np.ndarray], files: list[bytes]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    arrays = np.stack([pipeline(data) for data in files])
    return arrays, (time.perf_counter() - start) / len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "exported" / "mnist-cnn.onnx", help="ONNX model")
    parser.add_argument("--count", type=int, default=1000, help="MNIST test digits to render (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--data-dir", type=Path, default=None, help="MNIST IDX files (default: data/mnist)")
    parser.add_argument("--save", type=Path, default=None, help="also write the rendered uploads here")
    args = parser.parse_args()

    arrays = load_arrays(args.data_dir)
    rng = np.random.default_rng(args.seed)
    pick = rng.choice(len(arrays["t10k-labels-idx1-ubyte"]), size=args.count, replace=False)
    digits, labels = arrays["t10k-images-idx3-ubyte"][pick], arrays["t10k-labels-idx1-ubyte"][pick]
    styles = [STYLES[i % len(STYLES)] for i in range(args.count)]
    files = [render(digit, style, rng) for digit, style in zip(digits, styles, strict=True)]
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        for i, (data, style) in enumerate(zip(files, styles, strict=True)):
            suffix = "jpg" if data[:2] == b"\xff\xd8" else "png"
            (args.save / f"{i:04d}-{style}-label{labels[i]}.{suffix}").write_bytes(data)

    session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    ceiling = classify(session, digits.astype(np.float32) / 255) == labels
    results = {"28x28 MNIST (ceiling)": (ceiling, 0.0)}
    pipelines = {"naive": naive, "naive + invert": naive_inverted, "ours": lambda d: preprocess(d, **LIMITS)}
    for name, pipeline in pipelines.items():
        batch, seconds = run_pipeline(pipeline, files)
        results[name] = (classify(session, batch) == labels, seconds)

    print(f"model {args.model.name}, {args.count} MNIST test digits rendered as uploads (seed {args.seed})")
    print(f"{'pipeline':24} {'all':>7} " + " ".join(f"{s:>13}" for s in STYLES) + "   ms/image")
    style_array = np.array(styles)
    for name, (correct, seconds) in results.items():
        per_style = " ".join(f"{correct[style_array == s].mean():13.1%}" for s in STYLES)
        print(f"{name:24} {correct.mean():7.1%} {per_style}   {seconds * 1e3:8.2f}")


if __name__ == "__main__":
    main()

"""The CNN recipe's augmentations and outlier exposure, each turned off in turn: what each one earns or costs on
every realistic upload family of `make bench-preprocess`, on the test set and on the held-out drawn shapes.
`make ablation` (docs/training.md, "Ablation").

Every variant trains from the same seed for the same number of epochs (fewer than the recipe's: a screen, not the
shipped model; the ranking is what it gives), is exported and verified like any model (runs/ablation/), and
measured on the same uploads: they are rendered and preprocessed once (the preprocessing does not depend on the
model), so the variants differ only by their weights. ONNX files given with --models join the table as they are
(the shipped model, an earlier one from git).

    .venv/bin/python -m benchmarks.ablation [--epochs 6] [--variants recipe "no low-res"] [--models a.onnx ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from benchmarks.preprocess_accuracy import FAMILIES, LIMITS, render, right_answers, run_pipeline
from service.imaging.preprocess import preprocess
from training.data import load_arrays, load_mnist
from training.evaluate import evaluate_onnx
from training.export import export
from training.train import default_recipe, pick_device, train

REPO = Path(__file__).resolve().parent.parent
# Each variant: the recipe's fields it changes (0 turns an augmentation off).
VARIANTS: dict[str, dict[str, float | bool]] = {
    "recipe": {},
    "no low-res": {"low_res": 0.0},
    "no rotation": {"max_rotate": 0.0},
    "no elastic": {"elastic": 0.0},
    "no thickness": {"max_thickness": 0.0},
    "no shift, no scale": {"max_shift": 0.0, "max_scale": 0.0},
    "no outlier exposure": {"outliers": 0},
    "no drawn shapes": {"drawn_shapes": False},
    "no drawn shapes, no low-res (2026-12-02 recipe)": {"drawn_shapes": False, "low_res": 0.0},
}

Uploads = dict[str, tuple[np.ndarray, list, np.ndarray]]


def uploads(per_family: int, seed: int) -> Uploads:
    """Family -> (preprocessed pixels, refusal status or None per upload, labels): make bench-preprocess's uploads."""
    arrays = load_arrays()
    images, labels = arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]
    out: Uploads = {}
    for family in tqdm(FAMILIES, desc="uploads", unit="family", file=sys.stderr):
        rng = np.random.default_rng([seed, FAMILIES.index(family)])  # the benchmark's streams: the same files
        pick = rng.choice(len(labels), size=per_family, replace=False)
        files = [render(digit, family, rng, images) for digit in images[pick]]
        pixels, refused, _ = run_pipeline(lambda data: preprocess(data, **LIMITS), files)
        out[family] = (pixels, refused, labels[pick])
    return out


def measure(path: Path, families: Uploads) -> dict:
    """Test accuracy, ECE, not-a-digit figures and every upload family's accuracy of one ONNX file."""
    result = evaluate_onnx(path, ood=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    by_family = {
        family: float(right_answers(session, family, pixels, refused, labels).mean())
        for family, (pixels, refused, labels) in families.items()
    }
    ood = result["ood"]
    return {
        "test_accuracy": result["accuracy"],
        "ece": result.get("ece"),
        "auroc": ood["auroc"],
        "digits_flagged": ood["digits_flagged"],
        "shapes_not_ok": ood["drawn_shapes"]["not_ok"],
        "pairs_not_ok": ood["touching_pairs"]["not_ok"],
        "families": by_family,
        "families_mean": float(np.mean(list(by_family.values()))),
    }


def train_variant(name: str, epochs: int, seed: int, out_dir: Path) -> tuple[Path, float]:
    recipe = default_recipe("cnn", epochs=epochs, seed=seed, **VARIANTS[name])
    data = load_mnist(val_size=recipe.val_size, seed=recipe.seed)
    start = time.perf_counter()
    run = train(recipe, pick_device("auto"), data, runs_dir=out_dir / "runs", command=f"ablation: {name}")
    slug = name.split(" (")[0].replace(" ", "-").replace(",", "")
    report = export(run.checkpoint, out_dir, name=f"mnist-cnn-{slug}")
    return report.path, time.perf_counter() - start


def table(results: dict[str, dict]) -> str:
    families = [f for f in FAMILIES if any(f in r["families"] for r in results.values())]
    head = ["variant", "test", "ECE", "AUROC", "shapes not ok", "pairs not ok", "uploads mean", *families]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        cells = [
            name,
            f"{100 * r['test_accuracy']:.2f}%",
            f"{r['ece']:.4f}" if r["ece"] is not None else "-",
            f"{r['auroc']:.3f}",
            f"{100 * r['shapes_not_ok']:.1f}%",
            f"{100 * r['pairs_not_ok']:.1f}%",
            f"{100 * r['families_mean']:.1f}%",
            *(f"{100 * r['families'][f]:.1f}" for f in families),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6, help="epochs per variant (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="training seed, the same for every variant")
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--models", nargs="*", type=Path, default=[], help="ONNX files measured as they are")
    parser.add_argument("--per-family", type=int, default=250, help="uploads per family (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "ablation", help="(default: runs/ablation)")
    args = parser.parse_args()

    families = uploads(args.per_family, seed=0)
    results: dict[str, dict] = {}
    for path in args.models:
        results[path.name] = measure(path, families)
        print(table({path.name: results[path.name]}), flush=True)
    for name in args.variants:
        path, seconds = train_variant(name, args.epochs, args.seed, args.out)
        results[name] = {**measure(path, families), "train_seconds": round(seconds, 1), "file": str(path)}
        print(f"{name}: trained and exported in {seconds:.0f} s", flush=True)
        print(table({name: results[name]}), flush=True)
        (args.out / "ablation.json").write_text(json.dumps(results, indent=2))
    print(f"\n{args.epochs} epochs per variant, seed {args.seed}, {args.per_family} uploads per family\n")
    print(table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.json").write_text(json.dumps(results, indent=2))
    (args.out / "ablation.md").write_text(table(results) + "\n")


if __name__ == "__main__":
    main()

"""Command line: ``python -m training {data,train,evaluate,export}``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path

# Before torch (and its OpenMP runtime) is imported: idle OpenMP threads sleep instead of spinning. On a
# 2-core machine shared with other work, spinning threads made a CNN step 2.9x slower (969 vs 340 ms, measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from training.data import DEFAULT_CACHE, DataError, given_dir

REPO = Path(__file__).resolve().parent.parent
SCRATCH_DIR = REPO / "runs" / "export"  # where an export goes unless told: never what the service ships


def cmd_data(args: argparse.Namespace) -> int:
    from training.data import locate

    paths = locate(given_dir(args.data_dir))
    for name, path in paths.items():
        print(f"{name}: {path} (SHA-256 verified)")
    return 0


# Flags that set the Recipe field of the same name as they are.
RECIPE_FLAGS = (
    "epochs", "batch_size", "lr", "seed", "val_size", "train_subset", "patience", "label_smoothing", "pairs",
    "low_res", "max_rotate", "max_shift", "max_scale", "max_thickness", "elastic", "split_seed",
    "distill_weight", "distill_temperature",
)  # fmt: skip


def cmd_train(args: argparse.Namespace) -> int:
    from training.models import MODELS
    from training.train import default_recipe, pick_device, train

    if args.model not in MODELS:
        raise ValueError(f"unknown model {args.model!r}; choose one of {', '.join(MODELS)}")
    device = pick_device(args.device)
    model_args = None
    if args.hidden is not None or args.dropout is not None or args.channels is not None:
        recipe = default_recipe(args.model)
        model_args = dict(recipe.model_args)
        for key in ("hidden", "dropout", "channels"):
            value = getattr(args, key)
            if value is not None:
                model_args[key] = value[0] if key == "hidden" and args.model == "cnn" else value
    if args.teachers is None and (args.distill_weight is not None or args.distill_temperature is not None):
        raise ValueError("--distill-weight and --distill-temperature need --teachers (the checkpoints that teach)")
    if args.distill_weight is not None and not 0 <= args.distill_weight <= 1:
        raise ValueError(f"--distill-weight must be in [0, 1], got {args.distill_weight}")
    if args.distill_temperature is not None and args.distill_temperature <= 0:
        raise ValueError(f"--distill-temperature must be > 0, got {args.distill_temperature}")
    for teacher in args.teachers or ():
        if not Path(teacher).is_file():
            raise ValueError(f"no such teacher checkpoint: {teacher}")
    recipe = default_recipe(
        args.model,
        model_args=model_args,
        augment=False if args.no_augment else None,
        outliers=0 if args.no_outliers else None,
        teachers=tuple(args.teachers) if args.teachers else None,
        **{field: getattr(args, field) for field in RECIPE_FLAGS},  # None: the recipe's own value
    )
    from training.data import load_mnist

    data = load_mnist(given_dir(args.data_dir), recipe.val_size, recipe.validation_seed(), recipe.train_subset)
    command = "python -m training " + " ".join(shlex.quote(a) for a in args.argv)
    result = train(recipe, device, data, command=command)
    m = result.metrics
    print(f"run: {result.run_dir}")
    print(f"best epoch {m['best_epoch']}: validation accuracy {100 * m['best_val_accuracy']:.2f}%")
    print(f"test accuracy {100 * m['test_accuracy']:.2f}% on {len(data.test_labels)} images")
    print(f"training wall time {m['train_seconds']:.1f} s on {m['device_name']}")
    if args.target is not None and m["test_accuracy"] < args.target:
        print(f"FAILED: test accuracy below the target {100 * args.target:.2f}%", file=sys.stderr)
        return 1
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_checkpoint, evaluate_onnx

    paths = [Path(f) for f in args.file]
    for path in paths:
        if not path.is_file():
            raise ValueError(f"no such file: {path}")
    path = paths[0]
    if path.suffix != ".onnx" and (args.ood or args.reliability):
        raise ValueError("--ood and --reliability measure an exported .onnx file (they read its metadata)")
    if len(paths) > 1 and any(p.suffix == ".onnx" for p in paths):
        raise ValueError("an ensemble is measured from checkpoints (.pt), not from ONNX files")
    result = (
        evaluate_onnx(path, given_dir(args.data_dir), ood=args.ood)
        if path.suffix == ".onnx"
        else evaluate_checkpoint(paths, given_dir(args.data_dir))
    )
    label = f"ensemble of {len(paths)} (mean logits)" if len(paths) > 1 else str(path)
    print(f"{label}: test accuracy {100 * result['accuracy']:.2f}% on {result['count']} images")
    for digit, acc in enumerate(result["per_class_accuracy"]):
        print(f"  digit {digit}: {100 * acc:.2f}%")
    if "ece" in result:
        print(
            f"expected calibration error (15 bins): {result['ece']:.4f} "
            f"(without the graph's temperature: {result['ece_uncalibrated']:.4f})"
        )
    if "ood" in result:
        ood = result["ood"]
        print(
            f"not a digit ({ood['score']} < {ood['threshold']:.4g}): AUROC {ood['auroc']:.4f} "
            f"({ood['digits']} test digits vs {ood['non_digits']} held-out non-digits)"
        )
        print(f"  non-digits flagged: {100 * ood['non_digits_flagged']:.1f}%")
        print(f"  MNIST test digits wrongly flagged: {100 * ood['digits_flagged']:.2f}%")
        for family, share in ood["flagged_by_family"].items():
            print(f"    {family}: {100 * share:.1f}% flagged")
        pairs = ood["touching_pairs"]
        print(
            f"  touching pairs of test digits ({pairs['count']}): {100 * pairs['flagged']:.1f}% not_a_digit, "
            f"{100 * pairs['not_ok']:.1f}% not ok (uncertain or not_a_digit)"
        )
        shapes = ood["drawn_shapes"]
        print(
            f"  hand-drawn shapes, held out ({shapes['count']}): {100 * shapes['flagged']:.1f}% not_a_digit, "
            f"{100 * shapes['not_ok']:.1f}% not ok (uncertain or not_a_digit)"
        )
        for family, share in shapes["not_ok_by_family"].items():
            print(f"    {family}: {100 * share:.1f}% not ok")
    if args.reliability:
        if "reliability" not in result:
            raise ValueError(f"{path} has no temperature metadata: nothing to compare")
        from training.plots import plot_reliability

        plot_reliability(result["reliability"], Path(args.reliability), title=path.stem)
        print(f"reliability diagram: {args.reliability}")
    if args.json:
        result.pop("reliability", None)
        print(json.dumps(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from training.export import SHIPPED_DIR, ExportError, export

    out = Path(args.out) if args.out else SHIPPED_DIR if args.replace else SCRATCH_DIR
    try:
        report = export(
            Path(args.checkpoint),
            out,
            name=args.name,
            int8=args.int8,
            data_dir=given_dir(args.data_dir),
            replace=args.replace,
        )
    except ExportError as exc:  # a refused replacement or a failed verification: nothing was written
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in report.summary():
        print(line)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log every step")
    sub = p.add_subparsers(dest="command", required=True)

    def with_data(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument(
            "--data-dir",
            help=f"directory with the MNIST IDX files (default: $MNIST_DATA_DIR, then "
            f"the cache {DEFAULT_CACHE}, then downloads)",
        )
        return sp

    with_data(sub.add_parser("data", help="find, download and verify the MNIST files")).set_defaults(fn=cmd_data)

    t = with_data(sub.add_parser("train", help="train a model; writes runs/<model>-<time>/"))
    t.add_argument("--model", default="cnn", help="mlp, cnn or cnn-tiny (default: cnn)")
    t.add_argument("--device", default="auto", help="auto, cuda or cpu (default: auto = CUDA when available)")
    t.add_argument("--epochs", type=int, help="default: the model's recipe")
    t.add_argument("--batch-size", type=int, help="default: 128")
    t.add_argument("--lr", type=float, help="peak one-cycle learning rate (default: the model's recipe)")
    t.add_argument("--hidden", type=int, nargs="+", help="hidden sizes (mlp) or dense width (cnn)")
    t.add_argument("--dropout", type=float, help="dropout probability")
    t.add_argument("--channels", type=int, nargs=2, help="cnn: channels of the two conv blocks")
    t.add_argument("--no-augment", action="store_true", help="turn batch augmentation off")
    t.add_argument("--label-smoothing", type=float, help="label smoothing of the digit loss (default: 0)")
    t.add_argument("--no-outliers", action="store_true", help="turn outlier exposure (non-digit images) off")
    # One flag per augmentation, for ablations (docs/training.md): 0 turns it off.
    t.add_argument("--max-rotate", type=float, help="degrees (default: the recipe's; 0: off)")
    t.add_argument("--max-shift", type=float, help="pixels (default: the recipe's; 0: off)")
    t.add_argument("--max-scale", type=float, help="relative (default: the recipe's; 0: off)")
    t.add_argument(
        "--max-thickness", type=float, help="stroke dilation/erosion strength (default: the recipe's; 0: off)"
    )
    t.add_argument("--elastic", type=float, help="elastic displacement, pixels (default: the recipe's; 0: off)")
    t.add_argument(
        "--low-res", type=float, help="share of images augmented to a low resolution (default: the recipe's; 0: off)"
    )
    t.add_argument(
        "--pairs", type=int, help="touching digit pairs among the outliers (default: the model's recipe; 0: none)"
    )
    t.add_argument(
        "--patience", type=int, help="early stopping patience in epochs, counted in the second half (default: 5)"
    )
    t.add_argument("--seed", type=int, help="seed for split, init and batches (default: 0)")
    t.add_argument("--split-seed", type=int, help="seed of the validation split (default: --seed)")
    t.add_argument("--teachers", nargs="+", metavar="CKPT", help="distil from these checkpoints' mean logits")
    t.add_argument("--distill-weight", type=float, help="share of the digit loss taught by the teachers (default: 0.9)")
    t.add_argument("--distill-temperature", type=float, help="temperature of the distillation (default: 4)")
    t.add_argument("--val-size", type=int, help="validation images held out of the training set (default: 5000)")
    t.add_argument("--train-subset", type=int, help="train on only this many images (quick runs)")
    t.add_argument("--target", type=float, help="exit non-zero if test accuracy (fraction) ends below this")
    t.set_defaults(fn=cmd_train)

    e = with_data(sub.add_parser("evaluate", help="test accuracy of a checkpoint (.pt) or an ONNX file (.onnx)"))
    e.add_argument("file", nargs="+", help="one .onnx or .pt file; several .pt files: their ensemble (mean logits)")
    e.add_argument("--json", action="store_true", help="also print the full result as JSON")
    e.add_argument("--ood", action="store_true", help="also measure 'not a digit' on the held-out non-digit set")
    e.add_argument("--reliability", metavar="PNG", help="write a reliability diagram (before/after the temperature)")
    e.set_defaults(fn=cmd_evaluate)

    x = with_data(sub.add_parser("export", help="export a checkpoint to verified ONNX"))
    x.add_argument("checkpoint")
    x.add_argument(
        "--out",
        help=f"output directory (default: {SCRATCH_DIR.relative_to(REPO)}/, or exported/ with --replace)",
    )
    x.add_argument(
        "--replace",
        action="store_true",
        help="write into exported/ (what the service ships), replacing a model of the same name only if this one "
        "is at least as accurate on the test set",
    )
    x.add_argument("--name", help="model name, e.g. mnist-cnn (default: mnist-<arch>)")
    x.add_argument("--int8", action="store_true", help="also write a statically quantised CPU variant if it pays")
    x.set_defaults(fn=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("training.data").setLevel(logging.INFO)  # say which data source is being tried
    logging.getLogger("training.train.run").setLevel(logging.INFO)  # say where a run writes, as it starts
    try:
        return args.fn(args)
    except (DataError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

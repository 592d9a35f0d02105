"""Calibration and the "not a digit" score: temperature fitting, expected calibration error, AUROC, thresholds.

NumPy only, so a shipped ONNX file can be measured without torch. Every function takes *logits* or
probabilities as NumPy arrays [N, 10]; "calibrated" means logits already divided by the temperature.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15
# "uncertain" below this calibrated confidence: once calibrated, a confidence of 0.9 is right 9 times in 10.
UNCERTAIN_BELOW = 0.9
# The share of validation digits the "not a digit" threshold may flag (the test set then shows the real share).
DIGITS_FLAGGED = 0.005
OOD_SCORES = ("max_probability", "logsumexp")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 that minimises the negative log-likelihood of softmax(logits / T).

    One parameter, convex in 1/T: a coarse log-spaced scan, then golden-section refinement around the best.
    """
    logits = logits.astype(np.float64)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 200))
    losses = [nll(logits / t, labels) for t in grid]
    best = int(np.argmin(losses))
    lo, hi = np.log(grid[max(best - 1, 0)]), np.log(grid[min(best + 1, len(grid) - 1)])
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if nll(logits / np.exp(a), labels) < nll(logits / np.exp(b), labels):
            hi = b
        else:
            lo = a
    return float(np.exp((lo + hi) / 2))


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Expected calibration error (equal-width confidence bins) and the per-bin figures for a diagram.

    ECE = sum over bins of (share of answers in the bin) x |accuracy in the bin - mean confidence in the bin|.
    """
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=bins)
    acc_sum = np.bincount(which, weights=correct.astype(np.float64), minlength=bins)
    nonzero = counts > 0
    mean_conf = np.where(nonzero, conf_sum / np.maximum(counts, 1), np.nan)
    accuracy = np.where(nonzero, acc_sum / np.maximum(counts, 1), np.nan)
    ece = float(np.sum(np.abs(acc_sum - conf_sum)) / len(labels))
    return {
        "ece": ece,
        "edges": edges.tolist(),
        "counts": counts.tolist(),
        "confidence": mean_conf.tolist(),
        "accuracy": accuracy.tolist(),
    }


def ece(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    return reliability(probabilities, labels, bins)["ece"]


def digit_score(logits: np.ndarray, kind: str) -> np.ndarray:
    """How much an input looks like a digit (higher: more), from calibrated logits; ``kind`` in OOD_SCORES.

    ``max_probability``: the calibrated confidence. ``logsumexp``: log sum exp of the calibrated logits (the
    negative free energy of Liu et al. 2020), which also sees how large the logits are, not only their spread.
    """
    if kind == "max_probability":
        return softmax(logits).max(axis=1)
    if kind == "logsumexp":
        m = logits.max(axis=1)
        return m + np.log(np.exp(logits - m[:, None]).sum(axis=1))
    raise ValueError(f"unknown OOD score {kind!r}; choose one of {', '.join(OOD_SCORES)}")


def statuses(
    probabilities: np.ndarray, logits: np.ndarray, kind: str, ood_threshold: float, uncertain_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """The service's status rule (service/inference/answers.py) on a graph's outputs: which inputs are answered
    ``not_a_digit``, and which are not ``ok`` (``not_a_digit``, or ``uncertain`` below the uncertain threshold)."""
    flagged = digit_score(logits, kind) < ood_threshold
    return flagged, flagged | (probabilities.max(axis=1) < uncertain_threshold)


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half): the ROC area."""
    scores = np.concatenate([positive, negative])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    # Average ranks over ties.
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.concatenate(([True], sorted_scores[1:] != sorted_scores[:-1])))
    ends = np.concatenate((starts[1:], [len(scores)]))
    for s, e in zip(starts, ends, strict=True):
        if e - s > 1:
            ranks[order[s:e]] = (s + 1 + e) / 2
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ood_threshold(digit_scores: np.ndarray, flagged: float = DIGITS_FLAGGED) -> float:
    """The score below which an input is "not a digit": flags the share ``flagged`` of these (validation) digits."""
    return float(np.quantile(digit_scores, flagged))


def ood_report(digit_scores: np.ndarray, other_scores: np.ndarray, threshold: float) -> dict:
    """AUROC of digits vs non-digits, and the shares each side flags at ``threshold``."""
    return {
        "auroc": auroc(digit_scores, other_scores),
        "non_digits_flagged": float((other_scores < threshold).mean()),
        "digits_flagged": float((digit_scores < threshold).mean()),
        "threshold": threshold,
        "digits": len(digit_scores),
        "non_digits": len(other_scores),
    }

"""training/calibrate.py on data whose answers are known: ECE, temperature, AUROC, thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from training.calibrate import auroc, digit_score, ece, fit_temperature, ood_report, ood_threshold, softmax, statuses


def synthetic(n: int, temperature: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn so that softmax(logits / temperature) is exactly calibrated."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0, 3, size=(n, 10))
    p = softmax(true_logits)
    labels = np.array([rng.choice(10, p=row) for row in p])
    return true_logits * temperature, labels


def test_temperature_recovers_the_one_that_calibrates() -> None:
    logits, labels = synthetic(20000, temperature=2.5)
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(2.5, rel=0.05)
    assert ece(softmax(logits / t), labels) < 0.015 < ece(softmax(logits), labels)


def test_ece_of_known_cases() -> None:
    labels = np.zeros(1000, dtype=int)
    sure_and_right = np.tile(np.eye(10)[0], (1000, 1))
    assert ece(sure_and_right, labels) == pytest.approx(0.0)
    # Always 0.8 on the predicted class, right 60% of the time: ECE 0.2.
    p = np.full((1000, 10), 0.2 / 9)
    p[:, 0] = 0.8
    labels = np.where(np.arange(1000) < 600, 0, 1)
    assert ece(p, labels) == pytest.approx(0.2)


def test_auroc_of_known_cases() -> None:
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert auroc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5  # ties count half
    rng = np.random.default_rng(0)
    assert auroc(rng.normal(size=5000), rng.normal(size=5000)) == pytest.approx(0.5, abs=0.02)


def test_threshold_flags_the_chosen_share_of_digits() -> None:
    digits = np.linspace(0, 1, 10001)
    threshold = ood_threshold(digits, 0.005)
    report = ood_report(digits, np.full(100, -1.0), threshold)
    assert report["digits_flagged"] == pytest.approx(0.005, abs=1e-3)
    assert report["non_digits_flagged"] == 1.0 and report["auroc"] == 1.0


def test_scores() -> None:
    logits = np.array([[10.0] + [0.0] * 9, [0.0] * 10])
    assert digit_score(logits, "max_probability") == pytest.approx([softmax(logits)[0, 0], 0.1])
    assert digit_score(logits, "logsumexp")[1] == pytest.approx(np.log(10))
    with pytest.raises(ValueError, match="unknown OOD score"):
        digit_score(logits, "entropy")


def test_statuses_follow_the_services_rule() -> None:
    """not_a_digit below the OOD threshold; not ok also below the uncertain threshold; else ok."""
    logits = np.log(np.array([[0.95] + [0.05 / 9] * 9, [0.6] + [0.4 / 9] * 9, [0.3] + [0.7 / 9] * 9]))
    probabilities = np.exp(logits)
    flagged, not_ok = statuses(probabilities, logits, "max_probability", 0.45, 0.9)
    assert flagged.tolist() == [False, False, True]
    assert not_ok.tolist() == [False, True, True]

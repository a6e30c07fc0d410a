"""Every metric of engine/metrics.py against an independent implementation."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    label_ranking_average_precision_score,
    top_k_accuracy_score,
)

from engine.metrics import (
    EvalAccumulator,
    PseudoLabelStats,
    average_precision_per_class,
    metric_key,
    ranking_metric_names,
    ranking_metrics,
    trivial_predictor_scores,
)

THETAS = (0.25, 0.5)
SEEDS = (0, 1, 2, 3)
REAL_JSON = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "real.json"


# -- inputs and references ---------------------------------------------------------------------------


def random_split(seed: int, n: int = 200, c: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits, labels (some -1) and multi-hot sets (some empty; labels sometimes inside, sometimes not)."""
    rng = np.random.default_rng(seed)
    logits = (rng.normal(0.0, 2.0, (n, c)) - 1.0).astype(np.float32)
    targets = rng.random((n, c)) < rng.uniform(0.05, 0.35, (n, 1))
    targets[rng.random(n) < 0.15] = False
    labels = rng.integers(0, c, n)
    for i in np.flatnonzero((rng.random(n) < 0.6) & targets.any(axis=1)):
        labels[i] = rng.choice(np.flatnonzero(targets[i]))
    labels[rng.random(n) < 0.05] = -1
    assert (~targets.any(axis=1)).sum() > 0 and (labels == -1).sum() > 0
    return logits, labels, targets


def accumulate(logits, labels, targets, method_kind="sigmoid", batch_size=None, **kwargs) -> dict[str, float]:
    has_targets = targets is not None
    acc = EvalAccumulator(logits.shape[1], THETAS, method_kind, has_targets, **kwargs)
    n = logits.shape[0]
    batch_size = batch_size or n
    for start in range(0, n, batch_size):
        part = slice(start, start + batch_size)
        acc.update(
            torch.from_numpy(logits[part]),
            torch.from_numpy(labels[part]).long(),
            None if targets is None else torch.from_numpy(targets[part]).float(),
        )
    return acc.compute()


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def prediction_sets(logits: np.ndarray, theta: float, method_kind: str) -> np.ndarray:
    predicted = np.zeros(logits.shape, dtype=bool)
    if method_kind == "sigmoid":
        predicted = sigmoid(logits) > theta
    predicted[np.arange(len(logits)), logits.argmax(axis=1)] = True
    return predicted


def reference_secondary_map(scores: np.ndarray, labels: np.ndarray, targets: np.ndarray) -> float:
    evaluated = targets.any(axis=1)
    aps = []
    for c in range(targets.shape[1]):
        rows = evaluated & (labels != c)
        if targets[rows, c].any():
            aps.append(average_precision_score(targets[rows, c], scores[rows, c]))
    return float(np.mean(aps))


def assert_same(actual: dict, expected: dict, rel: float = 1e-9) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=rel, abs=1e-12, nan_ok=True), key


# -- classification splits -----------------------------------------------------------------------------


def test_metric_key_spelling():
    assert metric_key("f1", 0.25) == "f1@0.25"
    assert metric_key("coverage", 0.5) == "coverage@0.5"
    assert metric_key("balanced_acc", 0.1) == "balanced_acc@0.1"


@pytest.mark.parametrize("method_kind", ["sigmoid", "softmax"])
@pytest.mark.parametrize("seed", SEEDS)
def test_multilabel_metrics_match_independent_references(seed, method_kind):
    logits, labels, targets = random_split(seed)
    got = accumulate(logits, labels, targets, method_kind)
    evaluated = targets.any(axis=1)
    labelled = labels >= 0
    argmax = logits.argmax(axis=1)
    classes = np.arange(logits.shape[1])
    assert got["num_images"] == len(labels)
    assert got["num_evaluated"] == evaluated.sum()
    assert got["top1"] == pytest.approx(
        top_k_accuracy_score(labels[labelled], logits[labelled], k=1, labels=classes), rel=1e-12
    )
    assert got["top5"] == pytest.approx(
        top_k_accuracy_score(labels[labelled], logits[labelled], k=5, labels=classes), rel=1e-12
    )
    real_hits = [targets[i, argmax[i]] for i in range(len(labels)) if evaluated[i]]
    assert got["real_top1"] == pytest.approx(np.mean(real_hits), rel=1e-12)
    for theta in THETAS:
        predicted = prediction_sets(logits, theta, method_kind)
        expected_f1 = f1_score(targets[evaluated], predicted[evaluated], average="samples")
        assert got[metric_key("f1", theta)] == pytest.approx(expected_f1, rel=1e-9)
        sizes = [predicted[i].sum() for i in range(len(labels)) if evaluated[i]]
        assert got[metric_key("coverage", theta)] == pytest.approx(np.mean(sizes), rel=1e-12)
        if method_kind == "softmax":
            assert got[metric_key("coverage", theta)] == 1.0
    expected_map = reference_secondary_map(sigmoid(logits), labels, targets)
    assert got["secondary_map"] == pytest.approx(expected_map, rel=1e-9)


def test_sigmoid_prediction_set_always_holds_the_argmax():
    # All sigmoid scores below theta: P = {argmax}, so F1 and coverage equal the softmax ones.
    logits, labels, targets = random_split(7)
    logits = logits - 20.0
    kwargs = {"keep_scores_for_ranking": False}  # the matched-coverage sets differ by design
    assert_same(
        accumulate(logits, labels, targets, "sigmoid", **kwargs),
        accumulate(logits, labels, targets, "softmax", **kwargs),
    )


def test_split_without_multilabels_reports_coverage_over_all_images():
    logits, labels, _ = random_split(4)
    got = accumulate(logits, labels, None, "sigmoid")
    assert set(got) == {"num_images", "top1", "top5"} | {metric_key("coverage", t) for t in THETAS}
    for theta in THETAS:
        sizes = [prediction_sets(logits, theta, "sigmoid")[i].sum() for i in range(len(labels))]
        assert got[metric_key("coverage", theta)] == pytest.approx(np.mean(sizes), rel=1e-12)
    softmax = accumulate(logits, labels, None, "softmax")
    assert all(softmax[metric_key("coverage", t)] == 1.0 for t in THETAS)


def test_top5_needs_five_classes_and_unlabelled_samples_are_skipped():
    logits = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [5.0, 0.0, 0.0]], dtype=np.float32)
    got = accumulate(logits, np.array([0, 2, -1]), None, "softmax")
    assert "top5" not in got
    assert got["top1"] == 0.5 and got["num_images"] == 3


def test_hand_worked_example():
    # Image 0: P@0.5 = {0, 1}, T = {1}: argmax 0 not in T, F1 = 2/3. Image 1: empty T, outside E.
    # Image 2: P@0.5 = {2}, T = {2, 3}: F1 = 2/3, real hit. Image 3: P = {3}, T = {3}: F1 = 1.
    logits = np.array([[3, 1, -5, -5], [2, -5, -5, -5], [-5, -5, 4, -1], [-3, -3, -3, 2]], dtype=np.float32)
    labels = np.array([0, 0, 3, 3])
    targets = np.array([[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]], dtype=bool)
    got = accumulate(logits, labels, targets, "sigmoid")
    assert got["num_evaluated"] == 3
    assert got["real_top1"] == pytest.approx(2 / 3)
    assert got[metric_key("f1", 0.5)] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert got[metric_key("coverage", 0.5)] == pytest.approx(4 / 3)
    # Secondary classes: class 1 (image 0, label 0) ranks first among E minus label-1 images: AP 1.
    # Class 3 excludes images 2 and 3 (label 3), so it has no positive; classes 0 and 2 neither.
    assert got["secondary_map"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_batches_and_merges_equal_one_big_batch(seed):
    logits, labels, targets = random_split(seed)
    for kwargs in ({"method_kind": "sigmoid"}, {"method_kind": "softmax"}, {"attributes": True}):
        whole = accumulate(logits, labels, targets, **kwargs)
        assert_same(accumulate(logits, labels, targets, batch_size=37, **kwargs), whole)
    halves = [EvalAccumulator(12, THETAS, "sigmoid", True) for _ in range(2)]
    for acc, part in zip(halves, (slice(0, 71), slice(71, None))):
        acc.update(torch.from_numpy(logits[part]), torch.from_numpy(labels[part]), torch.from_numpy(targets[part]))
    assert_same(halves[0].merge(halves[1]).compute(), accumulate(logits, labels, targets))


def test_metric_names_are_the_computed_keys():
    logits, labels, targets = random_split(0)
    for kwargs in (
        {"method_kind": "softmax"},
        {"attributes": True},
        {"keep_scores_for_ranking": False},
        {"keep_scores_for_map": False},
    ):
        acc = EvalAccumulator(12, THETAS, kwargs.pop("method_kind", "sigmoid"), True, **kwargs)
        acc.update(torch.from_numpy(logits), torch.from_numpy(labels), torch.from_numpy(targets))
        assert tuple(acc.compute()) == acc.metric_names()
        if "keep_scores_for_ranking" in kwargs:
            assert not set(ranking_metric_names("sigmoid")) & set(acc.metric_names())
    assert "secondary_map" not in acc.metric_names()
    assert set(ranking_metric_names("sigmoid")) <= set(acc.metric_names())
    assert "m@matched" in ranking_metric_names("softmax") and "theta@matched" not in ranking_metric_names("softmax")


# -- metrics a larger prediction set cannot inflate ---------------------------------------------------------


def tied_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """random_split with logits on a 0.5 grid: many tied scores, inside rows and across images."""
    logits, labels, targets = random_split(seed)
    return (np.round(logits * 2) / 2).astype(np.float32), labels, targets


def ranked_classes(z: np.ndarray) -> np.ndarray:
    """Classes of one row, best first; equal logits by class index."""
    return np.lexsort((np.arange(len(z)), -z))


def reference_top_t_f1(logits: np.ndarray, targets: np.ndarray) -> float:
    evaluated = np.flatnonzero(targets.any(axis=1))
    predicted = np.zeros_like(targets)
    for i in evaluated:
        predicted[i, ranked_classes(logits[i])[: targets[i].sum()]] = True
    return f1_score(targets[evaluated], predicted[evaluated], average="samples")


def reference_matched_sigmoid(logits: np.ndarray, targets: np.ndarray, k: float | None = None) -> tuple:
    """(theta_k, F1, coverage) by trying every candidate theta in float64, without any sweep."""
    keep = targets.any(axis=1)
    z, truth = logits[keep], targets[keep]
    n = len(z)
    target_total = truth.sum() if k is None else k * n  # k·n: exact integers when k = mean |T|
    scores = sigmoid(z)
    argmax = np.zeros(z.shape, dtype=bool)
    argmax[np.arange(n), z.argmax(axis=1)] = True
    best = None
    for theta in np.unique(scores[~argmax]):  # ascending: a later equal distance is a larger theta
        predicted = argmax | (scores > theta)
        distance = abs(predicted.sum() - target_total)
        if best is None or distance <= best[0]:
            best = (distance, theta, f1_score(truth, predicted, average="samples"), predicted.sum() / n)
    assert best is not None
    return best[1:]


def reference_matched_softmax(logits: np.ndarray, targets: np.ndarray) -> tuple:
    """(m, F1, coverage): every set size 1..C tried, ties to the smaller m."""
    keep = targets.any(axis=1)
    z, truth = logits[keep], targets[keep]
    best = None
    for m in range(1, z.shape[1] + 1):
        predicted = np.zeros_like(truth)
        for i in range(len(z)):
            predicted[i, ranked_classes(z[i])[:m]] = True
        distance = abs(m * len(z) - truth.sum())
        if best is None or distance < best[0]:
            best = (distance, m, f1_score(truth, predicted, average="samples"), float(m))
    assert best is not None
    return best[1:]


@pytest.mark.parametrize("method_kind", ["sigmoid", "softmax"])
@pytest.mark.parametrize("seed", SEEDS)
def test_ranking_metrics_match_brute_force_and_sklearn_with_ties_and_empty_sets(seed, method_kind):
    logits, labels, targets = tied_split(seed)
    evaluated = targets.any(axis=1)
    assert not evaluated.all() and len(np.unique(logits)) < 40  # empty sets and ties are both there
    got = accumulate(logits, labels, targets, method_kind, batch_size=37)
    assert got["matched_target"] == pytest.approx(targets[evaluated].sum(axis=1).mean(), abs=1e-12)
    assert got["f1@top|T|"] == pytest.approx(reference_top_t_f1(logits, targets), abs=1e-6)
    expected_lrap = label_ranking_average_precision_score(targets[evaluated], logits[evaluated])
    assert got["lrap"] == pytest.approx(expected_lrap, abs=1e-6)
    if method_kind == "sigmoid":
        theta, f1, coverage = reference_matched_sigmoid(logits, targets)
        assert got["theta@matched"] == pytest.approx(theta, rel=1e-12)
    else:
        m, f1, coverage = reference_matched_softmax(logits, targets)
        assert got["m@matched"] == m
    assert got["f1@matched"] == pytest.approx(f1, abs=1e-6)
    assert got["coverage@matched"] == pytest.approx(coverage, abs=1e-12)


def test_matched_coverage_can_be_given():
    logits, labels, targets = tied_split(1)
    got = accumulate(logits, labels, targets, matched_coverage=2.5)
    theta, f1, coverage = reference_matched_sigmoid(logits, targets, k=2.5)
    assert got["matched_target"] == 2.5 and got["theta@matched"] == pytest.approx(theta, rel=1e-12)
    assert got["f1@matched"] == pytest.approx(f1, abs=1e-6) and got["coverage@matched"] == pytest.approx(coverage)


def test_images_with_empty_target_sets_take_no_part():
    logits, labels, targets = tied_split(2)
    keep = targets.any(axis=1)
    names = ranking_metric_names("sigmoid")
    with_empty = accumulate(logits, labels, targets)
    without = accumulate(logits[keep], labels[keep], targets[keep])
    assert {n: with_empty[n] for n in names} == pytest.approx({n: without[n] for n in names}, abs=1e-12)
    nobody = ranking_metrics(torch.from_numpy(logits[:5]), torch.zeros((5, 12), dtype=torch.bool), "sigmoid")
    assert all(math.isnan(value) for value in nobody.values())


def sigmoid64(logit: float) -> float:
    return torch.sigmoid(torch.tensor(logit, dtype=torch.float64)).item()


def matched(logits: list[list[float]], target_sets: list[list[int]], method_kind: str = "sigmoid") -> dict:
    z = torch.tensor(logits, dtype=torch.float32)
    targets = torch.zeros(z.shape, dtype=torch.bool)
    for i, classes in enumerate(target_sets):
        targets[i, classes] = True
    return {name: value.item() for name, value in ranking_metrics(z, targets, method_kind).items()}


def test_matched_threshold_is_the_exact_candidate_not_a_neighbour():
    # Non-argmax logits, descending: 1, 0.5, -0.5, -1, -2, -3. k = (2 + 1) / 2 = 1.5. Candidate thetas:
    # sigmoid(1) leaves nothing above: coverage 1 (F1 5/6); sigmoid(0.5) leaves logit 1 above: coverage
    # 1.5 = k (F1 1); sigmoid(-0.5) leaves 1 and 0.5: coverage 2 (F1 5/6). A step off either way fails.
    got = matched([[3, 1, -1, -2], [-3, 0.5, 2, -0.5]], [[0, 1], [2]])
    assert got["theta@matched"] == sigmoid64(0.5)
    assert got["coverage@matched"] == 1.5 and got["matched_target"] == 1.5
    assert got["f1@matched"] == pytest.approx(1.0, abs=1e-12)


def test_matched_threshold_ties_go_to_the_larger_theta():
    # Two non-argmax logits tie at 1: candidates give coverage 1 (theta = sigmoid(1)) or 2 (sigmoid(0)),
    # both 0.5 from k = 1.5; the larger theta wins. F1: {0} vs {0, 1} is 2/3, {2} vs {2} is 1.
    got = matched([[3, 1, -1, -2], [-3, 1, 2, 0]], [[0, 1], [2]])
    assert got["theta@matched"] == sigmoid64(1.0) and got["coverage@matched"] == 1.0
    assert got["f1@matched"] == pytest.approx((2 / 3 + 1) / 2, abs=1e-12)


def test_the_argmax_is_in_every_matched_set_and_is_no_candidate():
    # Image 0's argmax (logit -1) scores below theta_k = sigmoid(2.5) yet stays in its set. Counting the
    # argmax scores as candidates or as entries above a theta would pick sigmoid(3) (coverage 1.5 too).
    got = matched([[-1, -9, -9], [4, 3, 2.5]], [[0], [0, 1]])
    assert got["theta@matched"] == sigmoid64(2.5) and got["coverage@matched"] == 1.5
    assert got["f1@matched"] == pytest.approx(1.0, abs=1e-12)


def test_softmax_matched_set_size_rounds_halfway_down():
    logits = [[3, 2, 1, 0], [0, 1, 2, 3], [1, 1, 1, 1]]
    halfway = matched(logits[:2], [[0], [3, 1]], "softmax")  # k = 1.5: m = 1
    assert halfway["m@matched"] == 1 and halfway["coverage@matched"] == 1.0
    assert halfway["f1@matched"] == pytest.approx((1 + 2 / 3) / 2, abs=1e-12)
    above = matched(logits, [[0], [3, 1], [2, 3]], "softmax")  # k = 5/3: m = 2; ties pick classes 0, 1
    assert above["m@matched"] == 2 and above["f1@matched"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3, abs=1e-12)


def test_top_t_breaks_ties_by_class_index_and_lrap_by_sklearn_rule():
    got = matched([[1, 1, 1, 0], [0, 2, 2, 1]], [[1, 2], [2]])  # top-2 {0, 1}: 1/2; top-1 {1}: 0
    assert got["f1@top|T|"] == pytest.approx(0.25, abs=1e-12)
    targets = np.array([[0, 1, 1, 0], [0, 0, 1, 0]], dtype=bool)
    expected = label_ranking_average_precision_score(targets, np.array([[1, 1, 1, 0], [0, 2, 2, 1]]))
    assert got["lrap"] == pytest.approx(expected, abs=1e-12) and expected == pytest.approx((2 / 3 + 1 / 2) / 2)


# -- trivial predictors ---------------------------------------------------------------------------------------


def test_trivial_predictors_on_a_hand_worked_split():
    # C = 3. Image 0: y = 0, T = {0}. Image 1: y = 1, T = {0, 1, 2}. Image 2: empty T, out of E.
    # Image 3: y = 2, T = {0}. With k = 2 the random classes are all the others, so nothing is random.
    labels = np.array([0, 1, 0, 2])
    targets = np.array([[1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 0, 0]], dtype=bool)
    got = trivial_predictor_scores(labels, targets, 3, k_random=(2,))
    assert set(got) == {"given_label", "given_label+2_random", "all_classes"}
    assert got["given_label"]["f1"] == pytest.approx((1 + 2 / 4 + 0) / 3)
    assert got["given_label"]["coverage"] == 1.0
    assert got["given_label"]["f1@top|T|"] == pytest.approx((1 + 1 + 0) / 3)  # y first; |T| = 3 takes all
    for name in ("given_label+2_random", "all_classes"):
        assert got[name]["f1"] == pytest.approx((2 / 4 + 1 + 2 / 4) / 3) and got[name]["coverage"] == 3.0
    random_top_t = got["all_classes"]["f1@top|T|"]  # image 1 scores 1 whatever the order
    assert random_top_t in [pytest.approx(v) for v in ((1 + 1 + 0) / 3, (0 + 1 + 1) / 3, (0 + 1 + 0) / 3)]
    # k = 1: image 0 gets {0, r}, F1 2/3; image 1 {1, r} ⊂ T, F1 4/5; image 3 {2, r}: 2/3 if r = 0, else 0.
    one = trivial_predictor_scores(labels, targets, 3)["given_label+1_random"]
    assert one["coverage"] == 2.0 and one["f1"] in [pytest.approx((2 / 3 + 4 / 5 + x) / 3) for x in (0, 2 / 3)]


def test_trivial_random_classes_follow_their_expectation_and_the_seed():
    # Large split: the random-set F1 is within sampling noise of its closed-form expectation.
    rng = np.random.default_rng(0)
    n, c, k = 4000, 10, 2
    targets = rng.random((n, c)) < 0.3
    targets[np.arange(n), rng.integers(0, c, n)] = True
    labels = np.array([rng.choice(np.flatnonzero(row)) if rng.random() < 0.7 else rng.integers(c) for row in targets])
    got = trivial_predictor_scores(labels, targets, c, k_random=(k,), seed=5)
    size = targets.sum(axis=1)
    label_in = targets[np.arange(n), labels].astype(float)
    expected_hits = label_in + k * (size - label_in) / (c - 1)
    expected_f1 = np.mean(2 * expected_hits / (1 + k + size))
    assert got[f"given_label+{k}_random"]["f1"] == pytest.approx(expected_f1, abs=0.01)
    expected_top_t = np.mean((label_in + (size - 1) * (size - label_in) / (c - 1)) / size)
    assert got["given_label"]["f1@top|T|"] == pytest.approx(expected_top_t, abs=0.01)
    assert got["all_classes"]["f1@top|T|"] == pytest.approx(np.mean(size / c), abs=0.01)
    assert trivial_predictor_scores(labels, targets, c, (k,), seed=5) == got
    assert trivial_predictor_scores(labels, targets, c, (k,), seed=6) != got


def test_trivial_predictors_reject_bad_inputs():
    targets = np.eye(3, dtype=bool)
    with pytest.raises(ValueError, match="k_random"):
        trivial_predictor_scores(np.arange(3), targets, 3, k_random=(3,))
    with pytest.raises(ValueError, match="label in 0..2"):
        trivial_predictor_scores(np.array([0, -1, 2]), targets, 3)
    with pytest.raises(ValueError, match="N×4"):
        trivial_predictor_scores(np.arange(3), targets, 4)


# -- MILe's pseudo-labels -------------------------------------------------------------------------------------


def test_pseudo_label_stats_on_a_hand_worked_split():
    # rho 0.25: class c is a pseudo-label where sigmoid(z_c) > 0.25, i.e. z_c > log(1/3) = -1.0986.
    # Image 0: {0, 1, 3} (sigmoid(-1) = 0.269), argmax 0 in it, T = {0, 1}: 2 true pseudo-labels.
    # Image 1: nothing above rho (an empty set: its argmax 0 is not in it), T = {2}.
    # Image 2: {1}, argmax 1 in it, T = {1, 2, 3}: 1 true pseudo-label.
    logits = torch.tensor([[2.0, 0.0, -3.0, -1.0], [-2.0, -4.0, -1.5, -3.0], [-5.0, 1.0, -2.0, -2.0]])
    targets = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0], [0, 1, 1, 1]], dtype=torch.float32)
    stats = PseudoLabelStats(0.25, "cpu")
    stats.update(logits[:2], targets[:2])  # two batches add up
    stats.update(logits[2:], targets[2:])
    got = stats.compute(has_targets=True)
    assert got == pytest.approx(
        {
            "pseudo_set_size": (3 + 0 + 1) / 3,
            "pseudo_empty_fraction": 1 / 3,
            "pseudo_precision": (2 + 0 + 1) / (3 + 0 + 1),
            "pseudo_recall": (2 + 0 + 1) / (2 + 1 + 3),
        }
    )
    unlabelled = PseudoLabelStats(0.25, "cpu")
    unlabelled.update(logits, None)
    assert unlabelled.compute(has_targets=False) == {k: got[k] for k in ("pseudo_set_size", "pseudo_empty_fraction")}
    with pytest.raises(ValueError, match="rho"):
        PseudoLabelStats(1.0, "cpu")


# -- average precision -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_average_precision_with_ties_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, (150, 9)).astype(np.float32) / 5  # few distinct values: many ties
    positives = rng.random((150, 9)) < 0.3
    included = rng.random((150, 9)) < 0.8
    positives[:, 0] = False  # a class without positives -> NaN, left out of the mean
    got = average_precision_per_class(torch.from_numpy(scores), torch.from_numpy(positives), torch.from_numpy(included))
    assert math.isnan(got[0])
    for c in range(1, 9):
        rows = included[:, c]
        assert got[c].item() == pytest.approx(average_precision_score(positives[rows, c], scores[rows, c]), rel=1e-12)


def test_float16_score_storage_is_sklearn_ap_of_the_rounded_scores():
    logits, labels, targets = random_split(5)
    got = accumulate(logits, labels, targets, score_dtype=torch.float16)
    rounded = torch.sigmoid(torch.from_numpy(logits)).half().float().numpy()
    assert len(np.unique(rounded)) < rounded.size  # rounding did create ties
    assert got["secondary_map"] == pytest.approx(reference_secondary_map(rounded, labels, targets), rel=1e-9)


# -- attribute splits (CelebA) ---------------------------------------------------------------------------


@pytest.mark.parametrize("degenerate", ["nobody", "everybody"])
@pytest.mark.parametrize("seed", SEEDS)
def test_attribute_metrics_match_sklearn(seed, degenerate):
    logits, labels, targets = random_split(seed)
    logits[:10] = -30.0  # empty P; rows 0-4 also have empty T (score 1), rows 5-9 may not (score 0)
    targets[:5] = False
    if degenerate == "nobody":
        targets[:, 3] = False  # balanced accuracy of this attribute is the TNR alone
    else:
        targets[:, 4] = True  # the TPR alone (no empty T any more)
    got = accumulate(logits, labels, targets, attributes=True)
    assert got["num_images"] == len(labels)
    for theta in THETAS:
        predicted = sigmoid(logits) > theta
        expected_f1 = f1_score(targets, predicted, average="samples", zero_division=1.0)
        assert got[metric_key("f1", theta)] == pytest.approx(expected_f1, rel=1e-9)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn warns about the one-class attributes
            per_attribute = [balanced_accuracy_score(targets[:, c], predicted[:, c]) for c in range(12)]
        assert got[metric_key("balanced_acc", theta)] == pytest.approx(np.mean(per_attribute), rel=1e-12)


def test_attribute_f1_scores_empty_prediction_and_empty_truth_as_one():
    logits = np.array([[-9.0, -9.0, -9.0], [9.0, -9.0, -9.0], [-9.0, -9.0, -9.0]], dtype=np.float32)
    targets = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=bool)  # perfect, perfect, missed
    got = accumulate(logits, np.full(3, -1), targets, attributes=True)
    assert got[metric_key("f1", 0.5)] == pytest.approx(2 / 3)


# -- ReaL labels ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not REAL_JSON.exists(), reason=f"{REAL_JSON} not present")
def test_real_labels_on_imagenet_val_prefix():
    from timm.data import RealLabelsImagenet

    real_sets = json.loads(REAL_JSON.read_text())
    n, c = 2000, 1000
    targets = np.zeros((n, c), dtype=bool)
    for i, classes in enumerate(real_sets[:n]):
        targets[i, classes] = True
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(n, c)).astype(np.float32)
    labels = np.array([s[0] if s else rng.integers(c) for s in real_sets[:n]])
    got = accumulate(logits, labels, targets, batch_size=512)
    empty = [i for i, s in enumerate(real_sets[:n]) if not s]
    assert 0 < len(empty) and got["num_evaluated"] == n - len(empty)
    argmax = logits.argmax(axis=1)
    expected = np.mean([argmax[i] in real_sets[i] for i in range(n) if real_sets[i]])
    assert got["real_top1"] == pytest.approx(expected, rel=1e-12)
    names = [f"ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(len(real_sets))]
    timm_real = RealLabelsImagenet(names, real_json=str(REAL_JSON), topk=(1,))
    timm_real.add_result(torch.from_numpy(logits))
    assert got["real_top1"] == pytest.approx(timm_real.get_accuracy(k=1) / 100, rel=1e-12)


# -- distributed -------------------------------------------------------------------------------------------------


def _distributed_worker(rank: int, folder: str, shares: list[tuple[int, ...]]) -> None:
    """One rank: for each way of sharing the split, accumulate this rank's part and compute."""
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=2)
    try:
        logits, labels, targets = random_split(6)
        results = []
        for bounds in shares:
            part = slice(bounds[rank], bounds[rank + 1])
            acc = EvalAccumulator(12, THETAS, "sigmoid", True, score_dtype=torch.float16)
            if bounds[rank] < bounds[rank + 1]:
                acc.update(
                    torch.from_numpy(logits[part]), torch.from_numpy(labels[part]), torch.from_numpy(targets[part])
                )
            results.append(acc.compute())
        Path(folder, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_compute_equals_single_process(tmp_path):
    shares = [(0, 23, 200), (0, 0, 200)]  # unequal shares; a rank with no samples at all
    mp.spawn(_distributed_worker, args=(str(tmp_path), shares), nprocs=2)  # 2 processes: CI has 2 cores
    expected = accumulate(*random_split(6), score_dtype=torch.float16)
    for rank in range(2):
        for got in json.loads((tmp_path / f"rank{rank}.json").read_text()):
            assert_same(got, expected)


# -- device -----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_update_never_syncs_and_matches_cpu():
    logits, labels, targets = random_split(0)
    expected = accumulate(logits, labels, targets)
    acc = EvalAccumulator(12, THETAS, "sigmoid", True)  # adopts the first batch's device
    batch = [torch.from_numpy(x).cuda() for x in (logits, labels, targets)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside update raises
    try:
        for _ in range(2):  # second update: nothing lazily initialised hides a sync
            acc.update(*batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got = acc.compute()
    assert got.pop("num_images") == 2 * expected.pop("num_images")
    assert got.pop("num_evaluated") == 2 * expected.pop("num_evaluated")
    assert_same(got, expected, rel=1e-6)


# -- validation -------------------------------------------------------------------------------------------------


def test_bad_settings_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="thetas"):
        EvalAccumulator(10, (0.0,), "sigmoid", True)
    with pytest.raises(ValueError, match="method_kind"):
        EvalAccumulator(10, THETAS, "mile", True)
    with pytest.raises(ValueError, match="matched_coverage"):
        EvalAccumulator(10, THETAS, "sigmoid", True, matched_coverage=0.5)
    with pytest.raises(ValueError, match="attributes"):
        EvalAccumulator(10, THETAS, "sigmoid", False, attributes=True)
    acc = EvalAccumulator(10, THETAS, "sigmoid", True)
    with pytest.raises(ValueError, match="targets"):
        acc.update(torch.zeros(4, 10), torch.zeros(4, dtype=torch.int64), None)
    with pytest.raises(ValueError, match="logits"):
        acc.update(torch.zeros(4, 9), torch.zeros(4, dtype=torch.int64), torch.zeros(4, 9))
    with pytest.raises(ValueError, match="labels"):
        acc.update(torch.zeros(4, 10), torch.zeros(4, dtype=torch.int32), torch.zeros(4, 10))
    with pytest.raises(ValueError, match="meta"):
        EvalAccumulator(10, THETAS, "sigmoid", False, device="meta").update(
            torch.zeros(4, 10), torch.zeros(4, dtype=torch.int64)
        )

"""Evaluation metrics, accumulated on device over a whole eval split.

Owns: ``EvalAccumulator`` (top-1/top-5, ReaL-style accuracy, F1@theta, label coverage@theta,
secondary-label recovery mAP, the ranking metrics a larger prediction set cannot inflate, and for
attribute splits per-sample F1@theta and per-attribute balanced accuracy), ``ranking_metrics`` (F1 at
matched coverage, top-|T| F1, label-ranking AP), ``trivial_predictor_scores`` (the model-free
references), ``average_precision_per_class`` (scikit-learn's average precision, ties included, in
torch), ``metric_key`` (the one spelling of threshold-suffixed metric names) and ``prediction_sets``
(the prediction-set rule, also what ``mile-predict`` reports).

``update`` does only device work (no ``.item()``, no branching on tensor values), so it can sit in the
eval loop without stalling the device. ``compute`` is the one deliberate host sync; under
``torch.distributed`` it all-reduces the sums and all-gathers the per-image scores first, so every
rank must call it. All rates are fractions in [0, 1]; coverage is a mean set size; counts are ints.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

METHOD_KINDS = ("softmax", "sigmoid")
# Excluded (image, class) entries of the secondary-label AP are stored with this score: it sorts below
# every sigmoid output, so excluded entries never rank above an included one.
_EXCLUDED_SCORE = float("-inf")
# Bound on elements per class chunk of the AP computation: ~100 bytes of temporaries per element, so
# ~400 MB at most (ImageNet val: 12 chunks of ~90 classes).
_AP_CHUNK_ELEMENTS = 1 << 22


def metric_key(name: str, theta: float) -> str:
    """Name of a threshold-dependent metric, e.g. ``metric_key("f1", 0.25) == "f1@0.25"``."""
    return f"{name}@{float(theta)!r}"


class EvalAccumulator:
    """Device-side sums (and per-image scores for the secondary-label mAP) over one eval split.

    ``method_kind`` is how the model was trained: ``"softmax"`` (prediction set = {argmax}) or
    ``"sigmoid"`` (MILe too: prediction set = {argmax} ∪ {c : sigmoid(z_c) > theta}).
    ``has_targets``: ``update`` receives multi-hot targets (ReaL sets, grid digits, attributes).
    ``attributes``: the targets are independent binary attributes (CelebA); reports per-sample F1
    without a forced argmax and per-attribute balanced accuracy instead of the classification metrics.
    ``keep_scores_for_map``: keep N×C sigmoid scores in ``score_dtype`` (float16 halves the memory;
    AP is then exactly scikit-learn's on the float16-rounded scores, rounding creating ties).
    ``keep_scores_for_ranking``: keep N×C float32 logits and the targets for ``ranking_metrics``
    (multi-label classification splits only); ``matched_coverage`` is its k (None: mean |T_i| over E).
    """

    def __init__(
        self,
        num_classes: int,
        thetas: tuple[float, ...],
        method_kind: str,
        has_targets: bool,
        attributes: bool = False,
        keep_scores_for_map: bool = True,
        score_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        keep_scores_for_ranking: bool = True,
        matched_coverage: float | None = None,
    ) -> None:
        _validate_config(num_classes, tuple(thetas), method_kind, has_targets, attributes, score_dtype)
        _validate_matched_coverage(matched_coverage, num_classes)
        self.num_classes = num_classes
        self.thetas = tuple(float(t) for t in thetas)
        self.method_kind = method_kind
        self.has_targets = has_targets
        self.attributes = attributes
        self.keeps_map_scores = keep_scores_for_map and has_targets and not attributes
        self.keeps_ranking_scores = keep_scores_for_ranking and has_targets and not attributes
        self.matched_coverage = matched_coverage
        self.score_dtype = score_dtype
        # device=None: live on the device of the first batch. Pass it explicitly under NCCL, where a rank
        # without samples would otherwise hold CPU sums that NCCL cannot reduce.
        self._device_is_fixed = device is not None
        self.device = torch.device("cpu" if device is None else device)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated (reuse one accumulator for every evaluation)."""
        self._is_empty = True
        self._sums = {
            name: torch.zeros(shape, dtype=torch.float64, device=self.device)
            for name, shape in self._sum_shapes().items()
        }
        self._map_scores: list[torch.Tensor] = []
        self._map_positives: list[torch.Tensor] = []
        self._rank_logits: list[torch.Tensor] = []
        self._rank_truth: list[torch.Tensor] = []

    def metric_names(self) -> tuple[str, ...]:
        """The keys ``compute`` returns, in order (for table and CSV headers)."""
        if self.attributes:
            per_theta = [metric_key(n, t) for n in ("f1", "balanced_acc") for t in self.thetas]
            return ("num_images", *per_theta)
        names = ["num_images", "top1"] + (["top5"] if self.num_classes >= 5 else [])
        if self.has_targets:
            names += ["num_evaluated", "real_top1"] + [metric_key("f1", t) for t in self.thetas]
        names += [metric_key("coverage", t) for t in self.thetas]
        names += ["secondary_map"] if self.keeps_map_scores else []
        return tuple(names + (list(ranking_metric_names(self.method_kind)) if self.keeps_ranking_scores else []))

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        """Add one batch: ``logits`` N×C (any float dtype), ``labels`` int64 N (-1 = no single label),
        ``targets`` multi-hot N×C (float or bool; > 0.5 counts as present) when the split has them."""
        if self._is_empty and not self._device_is_fixed and logits.device != self.device:
            self.device = logits.device
            self.reset()  # fresh zeros there: nothing to copy, no sync
        self._check_inputs(logits, labels, targets)
        self._is_empty = False
        z = logits.float()  # bf16 autocast logits: argmax is unchanged, sigmoid gains precision
        probs = torch.sigmoid(z)
        truth = None if targets is None else targets > 0.5
        self._sums["num_images"] += z.shape[0]
        if self.attributes:
            assert truth is not None  # attributes imply has_targets, which _check_inputs held targets to
            self._update_attributes(probs, truth)
        else:
            self._update_classification(z, probs, labels, truth)

    def merge(self, other: EvalAccumulator) -> EvalAccumulator:
        """Fold ``other`` (same configuration and device) into this accumulator; returns self."""
        if self._config() != other._config():
            raise ValueError(
                f"cannot merge accumulators with different settings: {self._config()} vs {other._config()}"
            )
        self._is_empty = self._is_empty and other._is_empty
        for name, value in other._sums.items():
            self._sums[name] += value
        self._map_scores += other._map_scores
        self._map_positives += other._map_positives
        self._rank_logits += other._rank_logits
        self._rank_truth += other._rank_truth
        return self

    @torch.no_grad()
    def compute(self, process_group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Metrics over everything accumulated (over all ranks when torch.distributed is initialised;
        then every rank of ``process_group``, default the world, must call this)."""
        flat = torch.cat([value.reshape(-1) for value in self._sums.values()])
        if _distributed():
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
        # Metrics of the gathered per-image buffers: the same on every rank, so after the all-reduce.
        extra = self._buffer_metrics(process_group)
        if extra:
            flat = torch.cat([flat, torch.stack(list(extra.values())).to(flat.dtype)])
        # Deliberate host sync: the one device-to-host copy of every sum (and the buffer metrics) at once.
        values = flat.cpu().tolist()
        sums, offset = {}, 0
        for name, value in self._sums.items():
            sums[name] = values[offset] if value.ndim == 0 else values[offset : offset + value.numel()]
            offset += value.numel()
        results = self._attribute_results(sums) if self.attributes else self._classification_results(sums)
        results.update(zip(extra, values[offset:]))
        return results

    # -- accumulation ---------------------------------------------------------------------------

    def _sum_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {"num_images": ()}
        if self.attributes:
            shapes["positives"] = (self.num_classes,)
            for theta in self.thetas:
                shapes[metric_key("f1_sum", theta)] = ()
                shapes[metric_key("true_pos", theta)] = (self.num_classes,)
                shapes[metric_key("pred_pos", theta)] = (self.num_classes,)
            return shapes
        shapes.update(num_labelled=(), top1_hits=())
        if self.num_classes >= 5:
            shapes["top5_hits"] = ()
        if self.has_targets:
            shapes.update(num_evaluated=(), real_top1_hits=())
            shapes.update({metric_key("f1_sum", theta): () for theta in self.thetas})
        shapes.update({metric_key("coverage_sum", theta): () for theta in self.thetas})
        return shapes

    def _update_classification(
        self, z: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, truth: torch.Tensor | None
    ) -> None:
        sums = self._sums
        top1 = z.argmax(dim=1)
        labelled = labels >= 0
        sums["num_labelled"] += labelled.sum()
        sums["top1_hits"] += (labelled & (top1 == labels)).sum()
        if self.num_classes >= 5:
            top5 = z.topk(5, dim=1).indices
            sums["top5_hits"] += (labelled & (top5 == labels[:, None]).any(dim=1)).sum()
        classes = torch.arange(self.num_classes, device=z.device)
        argmax_set = classes == top1[:, None]
        # Coverage is over E where the split has multi-labels, over all images where it has none.
        evaluated = torch.ones_like(labelled) if truth is None else truth.any(dim=1)
        if truth is not None:
            sums["num_evaluated"] += evaluated.sum()
            sums["real_top1_hits"] += (evaluated & truth.gather(1, top1[:, None]).squeeze(1)).sum()
        for theta in self.thetas:
            predicted = prediction_set(argmax_set, probs, theta, self.method_kind)
            set_size = predicted.sum(dim=1)
            sums[metric_key("coverage_sum", theta)] += (set_size * evaluated).sum()
            if truth is not None:
                # Inside E, |P| >= 1 and |T| >= 1, so the clamp only guards the images outside E.
                f1 = 2 * (predicted & truth).sum(dim=1).double() / (set_size + truth.sum(dim=1)).clamp(min=1)
                sums[metric_key("f1_sum", theta)] += (f1 * evaluated).sum()
        if truth is not None and self.keeps_map_scores:
            self._keep_map_buffers(probs, labels, truth, evaluated)
        if truth is not None and self.keeps_ranking_scores:
            # A copy: z is the caller's tensor itself when the logits already are float32.
            self._rank_logits.append(z.clone())
            self._rank_truth.append(truth)

    def _keep_map_buffers(
        self, probs: torch.Tensor, labels: torch.Tensor, truth: torch.Tensor, evaluated: torch.Tensor
    ) -> None:
        # Entry (i, c) takes part in class c's AP iff i is in E and its own label is not c; storing
        # the exclusion in the score keeps one N×C buffer instead of scores, targets and labels.
        own_label = torch.arange(self.num_classes, device=labels.device) == labels[:, None]  # none for -1
        included = evaluated[:, None] & ~own_label
        self._map_scores.append(probs.masked_fill(~included, _EXCLUDED_SCORE).to(self.score_dtype))
        self._map_positives.append(truth & included)

    def _update_attributes(self, probs: torch.Tensor, truth: torch.Tensor) -> None:
        sums = self._sums
        sums["positives"] += truth.sum(dim=0)
        truth_size = truth.sum(dim=1)
        for theta in self.thetas:
            predicted = attribute_set(probs, theta)
            hits = predicted & truth
            denominator = predicted.sum(dim=1) + truth_size
            # Empty P and empty T is a perfect answer for an image without any attribute.
            f1 = torch.where(denominator > 0, 2 * hits.sum(dim=1).double() / denominator.clamp(min=1), 1.0)
            sums[metric_key("f1_sum", theta)] += f1.sum()
            sums[metric_key("true_pos", theta)] += hits.sum(dim=0)
            sums[metric_key("pred_pos", theta)] += predicted.sum(dim=0)

    def _check_inputs(self, logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None) -> None:
        n = logits.shape[0]
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must be N×{self.num_classes}, got shape {tuple(logits.shape)}")
        if labels.shape != (n,) or labels.dtype != torch.int64:
            raise ValueError(f"labels must be int64 of shape ({n},), got {labels.dtype} {tuple(labels.shape)}")
        if self.has_targets != (targets is not None):
            state = "is" if targets is None else "is not"
            raise ValueError(f"has_targets={self.has_targets} but targets {state} None")
        if targets is not None and targets.shape != logits.shape:
            raise ValueError(f"targets must match logits' shape {tuple(logits.shape)}, got {tuple(targets.shape)}")
        for name, tensor in (("logits", logits), ("labels", labels), ("targets", targets)):
            if tensor is not None and tensor.device.type != self.device.type:
                raise ValueError(f"{name} on {tensor.device}, accumulator on {self.device}")

    # -- results ----------------------------------------------------------------------------------

    def _classification_results(self, sums: dict) -> dict[str, float]:
        results: dict[str, float] = {"num_images": int(sums["num_images"])}
        results["top1"] = _ratio(sums["top1_hits"], sums["num_labelled"])
        if self.num_classes >= 5:
            results["top5"] = _ratio(sums["top5_hits"], sums["num_labelled"])
        coverage_count = sums["num_images"]
        if self.has_targets:
            coverage_count = sums["num_evaluated"]
            results["num_evaluated"] = int(coverage_count)
            results["real_top1"] = _ratio(sums["real_top1_hits"], coverage_count)
            for theta in self.thetas:
                results[metric_key("f1", theta)] = _ratio(sums[metric_key("f1_sum", theta)], coverage_count)
        for theta in self.thetas:
            results[metric_key("coverage", theta)] = _ratio(sums[metric_key("coverage_sum", theta)], coverage_count)
        return results

    def _attribute_results(self, sums: dict) -> dict[str, float]:
        num_images = sums["num_images"]
        results: dict[str, float] = {"num_images": int(num_images)}
        for theta in self.thetas:
            results[metric_key("f1", theta)] = _ratio(sums[metric_key("f1_sum", theta)], num_images)
        for theta in self.thetas:
            per_attribute = [
                _balanced_accuracy(true_pos, pred_pos, positives, num_images)
                for true_pos, pred_pos, positives in zip(
                    sums[metric_key("true_pos", theta)], sums[metric_key("pred_pos", theta)], sums["positives"]
                )
            ]
            results[metric_key("balanced_acc", theta)] = _ratio(sum(per_attribute), len(per_attribute))
        return results

    def _config(self) -> tuple:
        return (
            self.num_classes,
            self.thetas,
            self.method_kind,
            self.has_targets,
            self.attributes,
            self.keeps_map_scores,
            self.keeps_ranking_scores,
            self.matched_coverage,
            self.score_dtype,
            self.device,
        )

    def _buffer_metrics(self, process_group: dist.ProcessGroup | None) -> dict[str, torch.Tensor]:
        """0-dim tensors of the metrics computed from the kept per-image rows (all ranks' rows)."""
        out: dict[str, torch.Tensor] = {}
        if self.keeps_map_scores:
            scores = self._gathered_rows(self._map_scores, self.score_dtype, process_group)
            positives = self._gathered_rows(self._map_positives, torch.bool, process_group)
            out["secondary_map"] = torch.nanmean(average_precision_per_class(scores, positives))
        if self.keeps_ranking_scores:
            logits = self._gathered_rows(self._rank_logits, torch.float32, process_group)
            truth = self._gathered_rows(self._rank_truth, torch.bool, process_group)
            out.update(ranking_metrics(logits, truth, self.method_kind, self.matched_coverage))
        return out

    def _gathered_rows(
        self, parts: list[torch.Tensor], dtype: torch.dtype, process_group: dist.ProcessGroup | None
    ) -> torch.Tensor:
        rows = _cat_rows(parts, (0, self.num_classes), dtype, self.device)
        if not _distributed():
            return rows
        if dtype == torch.bool:
            # uint8 rather than bool: not every backend all-gathers bool tensors.
            return _all_gather_rows(rows.to(torch.uint8), process_group).bool()
        return _all_gather_rows(rows, process_group)


def prediction_set(argmax_set: torch.Tensor, probs: torch.Tensor, theta: float, method_kind: str) -> torch.Tensor:
    """Bool N×C prediction sets of a classifier (docs/DESIGN.md, "Metrics"): {argmax} for softmax-trained
    models, {argmax} ∪ {c : sigmoid(z_c) > theta} for sigmoid-trained ones (MILe too).
    ``argmax_set``: bool N×C, True at each row's argmax; ``probs``: sigmoid of the logits."""
    return argmax_set if method_kind == "softmax" else argmax_set | (probs > theta)


def attribute_set(probs: torch.Tensor, theta: float) -> torch.Tensor:
    """Bool N×C predicted attributes: {c : sigmoid(z_c) > theta}, no forced argmax (attributes are independent)."""
    return probs > theta


def prediction_sets(logits: torch.Tensor, theta: float, method_kind: str, attributes: bool = False) -> torch.Tensor:
    """Bool N×C prediction sets from logits, by the rules ``EvalAccumulator`` scores (``prediction_set``,
    ``attribute_set``); argmax ties go to the lower class index, as ``argmax`` gives them."""
    z = logits.float()
    probs = torch.sigmoid(z)
    if attributes:
        return attribute_set(probs, theta)
    classes = torch.arange(z.shape[1], device=z.device)
    return prediction_set(classes == z.argmax(dim=1)[:, None], probs, theta, method_kind)


def average_precision_per_class(
    scores: torch.Tensor, positives: torch.Tensor, included: torch.Tensor | None = None
) -> torch.Tensor:
    """Average precision of each column, exactly as ``sklearn.metrics.average_precision_score``.

    ``scores`` N×C (real; -inf marks an excluded entry), ``positives`` bool N×C, ``included`` optional
    bool N×C (entries outside it take no part). Returns float64 C, NaN for a column with no positive.
    AP = sum over positives of the precision at the *last* row of the positive's tie group: scikit-learn
    steps through distinct score thresholds, so tied scores enter the ranking together.
    """
    if included is not None:
        scores = scores.masked_fill(~included, _EXCLUDED_SCORE)
        positives = positives & included
    num_rows, num_classes = scores.shape
    chunk = max(1, _AP_CHUNK_ELEMENTS // max(num_rows, 1))
    parts = [
        _average_precision_columns(scores[:, start : start + chunk], positives[:, start : start + chunk])
        for start in range(0, num_classes, chunk)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=scores.device)


def _average_precision_columns(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    num_rows = scores.shape[0]
    if num_rows == 0:
        return torch.full((scores.shape[1],), math.nan, dtype=torch.float64, device=scores.device)
    # float32 sorts on every backend and holds float16 scores exactly.
    sorted_scores, order = scores.float().sort(dim=0, descending=True)
    hits = positives.gather(0, order).to(torch.float64)
    ranks = torch.arange(1, num_rows + 1, dtype=torch.float64, device=scores.device)[:, None]
    precision = hits.cumsum(dim=0) / ranks
    group_end = torch.ones_like(sorted_scores, dtype=torch.bool)
    group_end[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    rows = torch.arange(num_rows, device=scores.device)[:, None].expand_as(sorted_scores)
    # Each row's tie-group end = the first group end at or below it: a reversed running minimum.
    end_row = torch.where(group_end, rows, num_rows).flip(0).cummin(dim=0).values.flip(0)
    num_positives = hits.sum(dim=0)
    ap = (hits * precision.gather(0, end_row)).sum(dim=0) / num_positives.clamp(min=1)
    return torch.where(num_positives > 0, ap, math.nan)


# -- metrics a larger prediction set cannot inflate ----------------------------------------------------


PSEUDO_LABEL_NAMES = (
    "pseudo_set_size",
    "pseudo_empty_fraction",
    "pseudo_precision",
    "pseudo_recall",
)


class PseudoLabelStats:
    """The pseudo-labels a model would pass on as MILe's teacher, ``{c : sigmoid(z_c) > rho}``, over an
    eval split (docs/METRICS.md): mean set size, fraction of empty sets (a non-empty set always holds
    the argmax, the first class over rho), and, against the split's label sets, the share of
    pseudo-labels that are true (precision) and of true labels that are pseudo-labels (recall).
    Device-side sums; one host copy in ``compute``."""

    def __init__(self, rho: float, device: torch.device | str) -> None:
        if not 0.0 < rho < 1.0:
            raise ValueError(f"rho must be in (0, 1), got {rho}")
        self.logit_rho = math.log(rho) - math.log1p(-rho)
        # images, set sizes, empty sets, pseudo-labels that are true, true labels
        self._sums = torch.zeros(5, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor | None) -> None:
        z = logits.float()
        pseudo = z > self.logit_rho
        size = pseudo.sum(dim=1)
        truth = targets > 0.5 if targets is not None else torch.zeros_like(pseudo)
        batch = torch.stack(
            [
                torch.full((), float(z.shape[0]), dtype=torch.float64, device=z.device),  # a fill, no host copy
                size.sum().double(),
                (size == 0).sum().double(),
                (pseudo & truth).sum().double(),
                truth.sum().double(),
            ]
        )
        self._sums += batch

    @torch.no_grad()
    def compute(self, has_targets: bool) -> dict[str, float]:
        sums = self._sums.clone()
        if _distributed():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        images, sizes, empty, true_pseudo, true_labels = sums.cpu().tolist()  # one host copy
        out = {
            "pseudo_set_size": _ratio(sizes, images),
            "pseudo_empty_fraction": _ratio(empty, images),
        }
        if has_targets:
            out.update(pseudo_precision=_ratio(true_pseudo, sizes), pseudo_recall=_ratio(true_pseudo, true_labels))
        return out


def ranking_metric_names(method_kind: str) -> tuple[str, ...]:
    """Keys of ``ranking_metrics`` for models trained with ``method_kind``, in order."""
    size_key = "theta@matched" if method_kind == "sigmoid" else "m@matched"
    return ("matched_target", size_key, "coverage@matched", "f1@matched", "f1@top|T|", "lrap")


@torch.no_grad()
def ranking_metrics(
    logits: torch.Tensor, targets: torch.Tensor, method_kind: str, matched_coverage: float | None = None
) -> dict[str, torch.Tensor]:
    """F1 at matched coverage, top-|T| F1 and label-ranking AP, as float64 0-dim tensors on the logits' device.

    ``logits`` N×C, ``targets`` multi-hot N×C (> 0.5 or True is present). Only the evaluated images E,
    those with a non-empty target set |T_i| > 0, count (ReaL leaves some sets empty: such an image has
    no right answer, so it is left out, not scored 0 or 1); with E empty every value is NaN. F1 is
    always the per-image 2|P_i ∩ T_i| / (|P_i| + |T_i|), averaged over E.

    - ``matched_target``: k, the coverage to match; ``matched_coverage`` or, when None, mean |T_i| over E.
    - sigmoid models: ``theta@matched`` is theta_k, the candidate theta whose coverage (mean |P_i| over
      E, P_i = {argmax} ∪ {c : sigmoid(z_ic) > theta}, sigmoid in float64) is closest to k, ties to the
      larger theta. Candidates are the distinct scores of the non-argmax entries: coverage changes
      only there (the argmax is in every set). Below every score all classes are predicted; that
      threshold is no candidate, so theta_k is always an observed score.
    - softmax models: ``m@matched`` is the set size m in 1..C closest to k, P_i = the top-m classes;
      halfway ties go to the smaller m (the smaller set, as the sigmoid ties go to the larger theta).
    - ``coverage@matched`` and ``f1@matched``: the coverage and F1 of those sets.
    - ``f1@top|T|``: P_i = the |T_i| highest-scoring classes (= precision = recall).
    - ``lrap``: scikit-learn's ``label_ranking_average_precision_score`` over E (tied scores share the
      worst rank of their group).
    Rankings (top-m, top-|T|, LRAP) order the logits, which every model's scores are monotone in and
    which do not saturate as float sigmoids do; equal logits order by class index, lower first (the
    first-maximum rule of ``argmax``), except in LRAP, whose tie rule is scikit-learn's.
    """
    if method_kind not in METHOD_KINDS:
        raise ValueError(f"method_kind must be one of {METHOD_KINDS}, got {method_kind!r}")
    truth = targets if targets.dtype == torch.bool else targets > 0.5
    evaluated = truth.any(dim=1)
    # Deliberate host sync: boolean indexing sizes the rows of E.
    z, truth = logits[evaluated].float(), truth[evaluated]
    num_rows, num_classes = z.shape
    names = ranking_metric_names(method_kind)
    if num_rows == 0:
        return {name: torch.tensor(math.nan, dtype=torch.float64, device=z.device) for name in names}
    # k times |E|: exact integers in float64 for the default k, so distance ties compare exactly.
    target_total = (
        truth.sum().double()
        if matched_coverage is None
        else torch.tensor(matched_coverage * num_rows, dtype=torch.float64, device=z.device)
    )
    if method_kind == "sigmoid":
        set_size = _matched_threshold(z, target_total)
    else:
        set_size = _matched_set_size(target_total, num_rows, num_classes)
    sums = torch.zeros(4, dtype=torch.float64, device=z.device)
    chunk = max(1, _AP_CHUNK_ELEMENTS // max(num_classes, 1))
    for start in range(0, num_rows, chunk):
        sums += _ranking_sums(z[start : start + chunk], truth[start : start + chunk], method_kind, set_size)
    f1_matched, coverage, f1_top_t, lrap = sums / num_rows
    return dict(zip(names, (target_total / num_rows, set_size.double(), coverage, f1_matched, f1_top_t, lrap)))


def _ranking_sums(z: torch.Tensor, truth: torch.Tensor, method_kind: str, set_size: torch.Tensor) -> torch.Tensor:
    """Sums over these rows of (F1 at matched coverage, set size, top-|T| F1, LRAP)."""
    ranks = _class_ranks(z)
    if method_kind == "sigmoid":
        argmax_set = torch.arange(z.shape[1], device=z.device) == z.argmax(dim=1, keepdim=True)
        matched = argmax_set | (torch.sigmoid(z.double()) > set_size)
    else:
        matched = ranks < set_size
    top_t = ranks < truth.sum(dim=1, keepdim=True)
    return torch.stack(
        [
            _f1_per_image(matched, truth).sum(),
            matched.sum().double(),
            _f1_per_image(top_t, truth).sum(),
            _lrap_per_image(z, truth).sum(),
        ]
    )


def _matched_threshold(z: torch.Tensor, target_total: torch.Tensor) -> torch.Tensor:
    """theta_k: exact search over the distinct non-argmax sigmoid scores (one sort of N×C)."""
    num_rows, num_classes = z.shape
    if num_classes == 1:  # the set is {argmax} whatever theta: there is nothing to search
        return torch.tensor(math.nan, dtype=torch.float64, device=z.device)
    scores = torch.sigmoid(z.double())
    # The argmax is in every set whatever theta: its score is no candidate and adds to no count above.
    scores.scatter_(1, z.argmax(dim=1, keepdim=True), -math.inf)
    values, counts = torch.unique(scores, sorted=True, return_counts=True)  # ascending, values[0] = -inf
    entries_above = scores.numel() - counts.cumsum(0)  # entries scoring strictly above each value
    # |coverage - k| times |E|, for each candidate: theta = values[j], P_i = argmax plus the entries above.
    distance = (num_rows + entries_above[1:] - target_total).abs()
    positions = torch.arange(distance.numel(), device=z.device)
    best = torch.where(distance == distance.min(), positions, -1).max()  # ties: the largest theta
    return values[1:][best]


def _matched_set_size(target_total: torch.Tensor, num_rows: int, num_classes: int) -> torch.Tensor:
    """m in 1..C closest to k = target_total / num_rows; halfway ties to the smaller m."""
    lower = torch.floor(target_total / num_rows).clamp(1, num_classes)
    upper = (lower + 1).clamp(max=num_classes)
    upper_is_closer = (upper * num_rows - target_total).abs() < (target_total - lower * num_rows).abs()
    return torch.where(upper_is_closer, upper, lower)


def _class_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Position of each class in its row's descending order (0 = best); ties: lower class index first."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def _f1_per_image(predicted: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    hits = (predicted & truth).sum(dim=1).double()
    return 2 * hits / (predicted.sum(dim=1) + truth.sum(dim=1)).clamp(min=1)


def _lrap_per_image(scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """scikit-learn's label-ranking AP of each row (rows with an empty truth give NaN)."""
    num_classes = scores.shape[1]
    sorted_scores, order = scores.sort(dim=1, descending=True)
    hits = truth.gather(1, order)
    group_end = torch.ones_like(hits)
    group_end[:, :-1] = sorted_scores[:, :-1] != sorted_scores[:, 1:]
    positions = torch.arange(num_classes, device=scores.device).expand_as(order)
    # Each position's tie-group end = the first group end at or after it: a reversed running minimum.
    end = torch.where(group_end, positions, num_classes).flip(1).cummin(dim=1).values.flip(1)
    # scikit-learn's "max" rank: a label counts every label scoring >= it, its ties included.
    labels_at_or_above = (end + 1).double()
    relevant_at_or_above = hits.long().cumsum(dim=1).gather(1, end).double()
    return (hits * relevant_at_or_above / labels_at_or_above).sum(dim=1) / hits.sum(dim=1)


@torch.no_grad()
def trivial_predictor_scores(
    labels: torch.Tensor, targets: torch.Tensor, num_classes: int, k_random: tuple[int, ...] = (1,), seed: int = 0
) -> dict[str, dict[str, float]]:
    """What predictors without a model score on a split: the references for F1 and coverage.

    ``labels`` int N (the given single label y_i), ``targets`` multi-hot N×C; numpy arrays or tensors.
    Over E (the images with |T_i| > 0, as in ``ranking_metrics``; each needs y_i in 0..C-1), the same
    F1 as F1@theta and the coverage (mean |P_i|), per predictor:

    - ``given_label``: P_i = {y_i}; also ``f1@top|T|`` of the ranking y_i first, the rest in random order.
    - ``given_label+{k}_random`` for each k in ``k_random``: {y_i} ∪ k classes drawn uniformly from the
      others (nested: the draw for k=1 is inside the one for k=2). Its ranking is the given label's, so
      it reports no top-|T| F1 of its own.
    - ``all_classes``: P_i = every class; ``f1@top|T|`` of a random ranking (chance level).
    Random orders come from a CPU generator seeded with ``seed``, so any device gives the same values.
    """
    labels = torch.as_tensor(labels)
    truth = torch.as_tensor(targets) > 0.5
    _check_trivial_inputs(labels, truth, num_classes, k_random)
    evaluated = truth.any(dim=1)
    labels, truth = labels[evaluated].long(), truth[evaluated]
    if truth.shape[0] == 0:
        raise ValueError("trivial_predictor_scores: no image has a non-empty target set")
    if ((labels < 0) | (labels >= num_classes)).any():
        raise ValueError(f"trivial_predictor_scores: every image with targets needs a label in 0..{num_classes - 1}")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(truth.shape, generator=generator, dtype=torch.float64).to(truth.device)
    # noise < 1, so the given label ranks first and the other classes in a uniformly random order.
    given_first = _class_ranks(noise + (torch.arange(num_classes, device=truth.device) == labels[:, None]))
    top_t = truth.sum(dim=1, keepdim=True)
    out = {"given_label": _set_scores(given_first < 1, truth, given_first < top_t)}
    for k in k_random:
        out[f"given_label+{k}_random"] = _set_scores(given_first < 1 + k, truth)
    out["all_classes"] = _set_scores(torch.ones_like(truth), truth, _class_ranks(noise) < top_t)
    return out


def _set_scores(predicted: torch.Tensor, truth: torch.Tensor, top_t: torch.Tensor | None = None) -> dict[str, float]:
    """F1 and coverage of the sets ``predicted``, and the F1 of the top-|T| sets ``top_t`` when given."""
    out = {"f1": _f1_per_image(predicted, truth).mean().item(), "coverage": predicted.sum(dim=1).double().mean().item()}
    if top_t is not None:
        out["f1@top|T|"] = _f1_per_image(top_t, truth).mean().item()
    return out


def _check_trivial_inputs(
    labels: torch.Tensor, truth: torch.Tensor, num_classes: int, k_random: tuple[int, ...]
) -> None:
    prefix = "trivial_predictor_scores:"
    if truth.ndim != 2 or truth.shape[1] != num_classes:
        raise ValueError(f"{prefix} targets must be N×{num_classes}, got {tuple(truth.shape)}")
    if labels.shape != truth.shape[:1]:
        raise ValueError(f"{prefix} labels must have shape ({truth.shape[0]},), got {tuple(labels.shape)}")
    bad = [k for k in k_random if not (isinstance(k, int) and 1 <= k <= num_classes - 1)]
    if bad:
        raise ValueError(f"{prefix} k_random entries must be integers in 1..{num_classes - 1}, got {bad}")


def _balanced_accuracy(true_pos: float, pred_pos: float, positives: float, num_images: float) -> float:
    """(TPR + TNR) / 2 for one attribute; where one rate is undefined (no positives, or no negatives)
    the other alone, as ``sklearn.metrics.balanced_accuracy_score`` does; NaN with no images."""
    negatives = num_images - positives
    true_neg = negatives - (pred_pos - true_pos)
    rates = ([true_pos / positives] if positives > 0 else []) + ([true_neg / negatives] if negatives > 0 else [])
    return _ratio(sum(rates), len(rates))


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _cat_rows(
    parts: list[torch.Tensor], empty_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(empty_shape, dtype=dtype, device=device)


def _all_gather_rows(tensor: torch.Tensor, process_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's rows (rank order); ranks may hold different numbers of rows."""
    world_size = dist.get_world_size(process_group)
    count = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count, group=process_group)
    # Deliberate host sync: the row counts size the padded buffers of the gather below.
    sizes = [int(c) for c in torch.cat(counts).cpu().tolist()]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=process_group)
    return torch.cat([part[:size] for part, size in zip(gathered, sizes)])


def _validate_config(
    num_classes: int,
    thetas: tuple[float, ...],
    method_kind: str,
    has_targets: bool,
    attributes: bool,
    score_dtype: torch.dtype,
) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not thetas or any(not 0.0 < t < 1.0 for t in thetas):
        raise ValueError(f"thetas must be a non-empty tuple of values in (0, 1), got {thetas}")
    if len(set(thetas)) != len(thetas):
        raise ValueError(f"thetas must be distinct, got {thetas}")
    if method_kind not in METHOD_KINDS:
        raise ValueError(f"method_kind must be one of {METHOD_KINDS} (MILe is 'sigmoid'), got {method_kind!r}")
    if attributes and not has_targets:
        raise ValueError("attributes=True needs has_targets=True (attribute targets come as multi-hot)")
    if not score_dtype.is_floating_point:
        raise ValueError(f"score_dtype must be a floating dtype, got {score_dtype}")


def _validate_matched_coverage(matched_coverage: float | None, num_classes: int) -> None:
    # Every prediction set holds at least the argmax and at most every class.
    if matched_coverage is not None and not 1.0 <= matched_coverage <= num_classes:
        raise ValueError(f"matched_coverage must be None (mean |T|) or in [1, {num_classes}], got {matched_coverage}")


def coverage_curve(
    logits: torch.Tensor, targets: torch.Tensor, method_kind: str, thetas: tuple[float, ...]
) -> list[dict[str, float | str]]:
    """F1 against label coverage as the prediction set grows, over E (images with |T_i| > 0).

    Sigmoid-trained models: one point per theta, P_i = {argmax} ∪ {c : sigmoid(z_ic) > theta} (the
    F1@theta sets). Softmax-trained models have no calibrated per-class probability, so their points
    are the top-m sets, m = 1..C (the rule F1 at matched coverage uses for them)."""
    z, truth = logits.float(), targets > 0.5
    evaluated = truth.any(dim=1)
    z, truth = z[evaluated], truth[evaluated]
    ranks = _class_ranks(z)
    if method_kind == "softmax":
        sets = [(f"m={m}", ranks < m) for m in range(1, z.shape[1] + 1)]
    else:
        argmax_set = ranks < 1
        sets = [(f"theta={theta:g}", argmax_set | (torch.sigmoid(z) > theta)) for theta in thetas]
    return [
        {
            "point": name,
            "coverage": predicted.sum(dim=1).double().mean().item(),
            "f1": _f1_per_image(predicted, truth).mean().item(),
        }
        for name, predicted in sets
    ]

"""A blend of runs: the fold ensembles of several runs (experiments, seeds, a classical model),
weighted by their out-of-fold probabilities and routed by the sensors a sequence has.

    python -m codes.inference.blend fit --members outputs/exp020/quick-s42 outputs/minirocket/s0 \\
        --out outputs/blends/<name> [--combine mean|log]
    python -m codes.inference.blend compare --members <run folders>     # every combine x method, nested
    python -m codes.inference.blend predict blend_dir=outputs/blends/<name> data=synthetic

**Members** are run folders (any experiment's, or ``codes.classical.minirocket``'s) trained on the
same data files and folds: :func:`check_members` compares them sequence by sequence and refuses a
mismatch (other sequences, another fold or label for a sequence, other data digests in
``run_record.json``, other class columns), naming the first difference.

**Routes.** Every sequence is answered on one of two routes: ``imu_only`` (no thermopile or ToF
reading at all, as half of the hidden test set) or ``all_sensors``. A member *needs* either all
sensors or the IMU only (:func:`member_needs`: a run trained with ``data.use_thm=false
data.tof_mode=none``, or a classical member). Every member answers both routes (an all-sensor
model through its IMU-only path, what its IMU-only CV measures); each route has its own weights,
fitted on the members' out-of-fold probabilities of that route: ``prob_<gesture>`` and
``prob_imu_only_<gesture>`` of ``oof.parquet`` (a run written before training stored the
latter gets them from its saved folds, :func:`imu_only_oof`).

**Weights** (:func:`fit_weights`): the point of the simplex (w >= 0, sum 1) that minimises the
out-of-fold log loss of the combined probabilities: ``mean`` = sum_i w_i p_i, ``log`` =
softmax(sum_i w_i log p_i) (probabilities floored at :data:`PROBABILITY_FLOOR`). The problem is
convex in w for both; it is solved with SLSQP from equal weights. **Nested CV**
(:func:`nested_blend`): the weights that answer fold k are fitted on the other folds' OOF only,
and the blend's CV is scored on those answers; the in-sample figure (weights fitted on all OOF,
scored on the same OOF) is reported next to it and is optimistic. The served weights are the
ones fitted on all OOF.

**The blend folder** holds ``blend.json`` (members with their relative paths, experiment, needs
and folds; per route the weights, the nested per-fold weights, each member's CV, the equal-weight
CV, the in-sample and the nested CV) and ``metrics.json`` (the nested CV, in training's format).
:func:`load_blend` refuses a hand-edited ``blend.json`` whose weights are negative, not finite or
do not sum to 1, and a member whose folder is damaged or no longer holds the folds fitted on: a
blend never serves without one of its members.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import yaml
from scipy.optimize import minimize

from codes.common.atomic_files import atomic_path
from codes.common.features import FeatureSettings
from codes.common.metric import competition_score
from codes.common.runs import REPO_ROOT, read_run_record, setup_logging, write_json_atomically
from codes.common.schema import (
    GESTURES,
    NUM_GESTURES,
    TARGET_GESTURES,
    TEST_COLUMNS,
    THM_COLUMNS,
    TOF_COLUMNS,
)
from codes.common.training import IMU_ONLY_PROBABILITY_PREFIX
from codes.inference.input_path import InputPath, sensor_columns_of
from codes.inference.predictor import HEAD_OUTPUTS, Clean, GestureAnswerer
from codes.inference.run_folder import (
    CONFIG_FILE,
    METRICS_FILE,
    RunFolderError,
    check_exp_name,
    load_run_config,
    run_exp_name,
)

logger = logging.getLogger(__name__)

BLEND_FILE = "blend.json"
BLEND_EXP_NAME = "blend"  # config.yaml's exp_name in a blend folder
BLEND_FORMAT = 1
OOF_FILE = "oof.parquet"
ROUTES = ("all_sensors", "imu_only")
COMBINES = ("mean", "log")
METHODS = ("log_loss", "greedy")  # how the weights are fitted (fit_weights)
GREEDY_STEPS = 40  # ensemble selection's additions
PROBABILITY_FLOOR = 1e-6  # log combine and log loss: probabilities below it count as this
WEIGHT_SUM_TOLERANCE = 1e-6
CLASSICAL_EXPERIMENTS = {"minirocket": "codes.classical.minirocket"}  # exp_name -> module with load_predictor
PROBABILITY_COLUMNS = [f"prob_{g}" for g in GESTURES]
BLEND_FOLDER_FILES = (BLEND_FILE, METRICS_FILE, CONFIG_FILE)
IMU_ONLY_COLUMNS = [f"{IMU_ONLY_PROBABILITY_PREFIX}{g}" for g in GESTURES]


class BlendError(ValueError):
    """Members that cannot be blended, or a damaged blend folder; the message names what differs."""


# ---------------------------------------------------------------- members and their OOF
def member_needs(run_dir: Path) -> str:
    """``imu_only`` for a run whose features read no thermopile and no ToF (``data.use_thm=false
    data.tof_mode=none``, or a classical member), else ``all_sensors``."""
    data = load_run_config(run_dir).get("data") or {}
    if not data.get("use_thm", True) and data.get("tof_mode", "summary") == "none":
        return "imu_only"
    return "all_sensors"


def member_module(exp_name: str):
    """The module whose ``load_predictor`` serves a run of ``exp_name``."""
    check_exp_name(exp_name, "a blend member")
    return importlib.import_module(CLASSICAL_EXPERIMENTS.get(exp_name, f"codes.exp.{exp_name}.inference"))


def load_member_predictor(run_dir: Path, folds: Sequence[int] | None = None, device="auto", **options):
    """The run folder's own predictor (its experiment's ``load_predictor``)."""
    return member_module(run_exp_name(run_dir)).load_predictor(run_dir, folds, device, **options)


@dataclass
class MemberOOF:
    """One member's out-of-fold probabilities, in its ``oof.parquet`` row order."""

    run_dir: Path
    name: str
    exp_name: str
    needs: str
    sequence_ids: np.ndarray  # (N,) str
    folds: np.ndarray  # (N,) int
    labels: np.ndarray  # (N,) gesture index
    probabilities: dict[str, np.ndarray]  # route -> (N, 18)
    data_digests: dict[str, str] | None

    def aligned_to(self, sequence_ids: np.ndarray) -> MemberOOF:
        """The same OOF in the order of ``sequence_ids`` (which must be this member's ids)."""
        order = pl.DataFrame({"sequence_id": self.sequence_ids, "row": np.arange(len(self.sequence_ids))})
        rows = (
            pl.DataFrame({"sequence_id": sequence_ids})
            .join(order, on="sequence_id", how="left", maintain_order="left")["row"]
            .to_numpy()
        )
        return MemberOOF(
            self.run_dir, self.name, self.exp_name, self.needs, self.sequence_ids[rows], self.folds[rows],
            self.labels[rows], {r: p[rows] for r, p in self.probabilities.items()}, self.data_digests,
        )  # fmt: skip


def member_name(run_dir: Path) -> str:
    """``<experiment folder>/<run>``: the run folder and its parent."""
    run_dir = Path(run_dir).resolve()
    return f"{run_dir.parent.name}/{run_dir.name}"


def check_class_columns(columns: Sequence[str], source: str) -> None:
    """A :class:`BlendError` unless the ``prob_<gesture>`` columns are the 18 gestures of
    ``codes.common.schema.GESTURES`` (their order is read by name)."""
    found = [c for c in columns if c.startswith("prob_") and not c.startswith(IMU_ONLY_PROBABILITY_PREFIX)]
    extra = sorted(set(found) - set(PROBABILITY_COLUMNS))
    missing = sorted(set(PROBABILITY_COLUMNS) - set(found))
    if extra or missing:
        raise BlendError(
            f"{source} holds another class list than the 18 gestures the blend answers: "
            + "; ".join(
                part
                for part in (
                    f"classes not in it: {', '.join(c[5:] for c in extra[:5])}" if extra else "",
                    f"missing: {', '.join(c[5:] for c in missing[:5])}" if missing else "",
                )
                if part
            )
            + ". Blend only runs trained on the same gestures"
        )


def read_member_oof(run_dir: Path, compute_missing: bool = True) -> MemberOOF:
    """The member's OOF (``oof.parquet``). Its IMU-only probabilities are the
    ``prob_imu_only_<gesture>`` columns; for an IMU-only member the same as ``prob_<gesture>``; for
    a run written before training stored them, :func:`imu_only_oof` (``compute_missing``)."""
    run_dir = Path(run_dir)
    path = run_dir / OOF_FILE
    if not path.is_file():
        raise RunFolderError(
            f"{run_dir} has no {OOF_FILE} (written when training finishes): only a finished run can "
            "be blended, its out-of-fold probabilities fit the weights"
        )
    try:
        oof = pl.read_parquet(path)
    except Exception as error:  # a truncated or foreign file
        raise RunFolderError(f"{path} is damaged ({type(error).__name__}: {str(error)[:200]})") from None
    check_class_columns(oof.columns, str(path))
    for column in ("sequence_id", "fold", "gesture"):
        if column not in oof.columns:
            raise RunFolderError(f"{path} lacks the column {column}")
    exp_name = run_exp_name(run_dir)
    needs = member_needs(run_dir)
    probabilities = {"all_sensors": oof.select(PROBABILITY_COLUMNS).to_numpy().astype(np.float64)}
    if all(c in oof.columns for c in IMU_ONLY_COLUMNS):
        probabilities["imu_only"] = oof.select(IMU_ONLY_COLUMNS).to_numpy().astype(np.float64)
    elif needs == "imu_only":
        probabilities["imu_only"] = probabilities["all_sensors"]
    elif compute_missing:
        logger.info(
            "%s has no %s columns: computing them with its saved folds", path, IMU_ONLY_PROBABILITY_PREFIX
        )
        probabilities["imu_only"] = imu_only_oof(run_dir, oof)
    else:
        raise RunFolderError(f"{path} has no {IMU_ONLY_PROBABILITY_PREFIX}<gesture> columns")
    gesture_index = {g: i for i, g in enumerate(GESTURES)}
    unknown = sorted(set(oof["gesture"].to_list()) - set(gesture_index))
    if unknown:
        raise BlendError(f"{path} labels sequences with gestures the blend does not know: {unknown[:5]}")
    record = read_run_record(run_dir)
    return MemberOOF(
        run_dir=run_dir,
        name=member_name(run_dir),
        exp_name=exp_name,
        needs=needs,
        sequence_ids=oof["sequence_id"].cast(pl.String).to_numpy().astype(str),
        folds=oof["fold"].to_numpy().astype(np.int64),
        labels=np.array([gesture_index[g] for g in oof["gesture"].to_list()], dtype=np.int64),
        probabilities=probabilities,
        data_digests=None if record is None else record.get("data"),
    )


def training_data_dir(run_dir: Path) -> Path:
    """The folder the run trained on, resolved from its config as training resolved it."""
    from codes.inference.batch import resolve_test_dir

    cfg = load_run_config(run_dir)
    return resolve_test_dir(cfg.data.get("source", "auto"), cfg, REPO_ROOT)


def imu_only_oof(run_dir: Path, oof: pl.DataFrame) -> np.ndarray:
    """``(N, 18)`` IMU-only probabilities of the run's OOF sequences (``oof`` row order): each
    fold's saved models answer their validation sequences of train.csv with the thermopile and ToF
    columns null, as in the hidden test set's IMU-only half (what training's IMU-only score does)."""
    from codes.common.data_files import TRAIN_DEMOGRAPHICS_FILE, read_demographics, read_train

    data_dir = training_data_dir(run_dir)
    train = read_train(data_dir)
    demographics = read_demographics(data_dir / TRAIN_DEMOGRAPHICS_FILE)
    predictor = load_member_predictor(run_dir, device="cpu", subject_aware=False)
    removed = [c for c in (*THM_COLUMNS, *TOF_COLUMNS) if c in train.columns]
    columns = [c for c in TEST_COLUMNS if c in train.columns]
    result = np.full((oof.height, NUM_GESTURES), np.nan)
    for fold in sorted(oof["fold"].unique().to_list()):
        rows = np.flatnonzero(oof["fold"].to_numpy() == fold)
        ids = oof["sequence_id"].cast(pl.String)[rows]
        frame = train.filter(pl.col("sequence_id").cast(pl.String).is_in(ids.implode())).select(columns)
        served = frame.with_columns(pl.lit(None, dtype=pl.Float32).alias(c) for c in removed)
        answers = predictor.restricted_to([fold]).predict_frame(served, demographics)
        by_id = dict(
            zip(answers["sequence_id"].to_list(), answers.select(PROBABILITY_COLUMNS).to_numpy(), strict=True)
        )
        result[rows] = np.stack([by_id[i] for i in ids.to_list()])
    return result


def check_members(members: Sequence[MemberOOF]) -> list[MemberOOF]:
    """The members aligned to the first one's sequence order; a :class:`BlendError` naming the
    first difference when they were not trained on the same data files, sequences, labels and folds."""
    if len(members) < 1:
        raise BlendError("a blend needs at least one member run")
    first = members[0]
    names = [m.name for m in members]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BlendError(f"the members name {', '.join(twice)} more than once; name each run once")
    aligned = [first]
    for member in members[1:]:
        where = f"{member.name} and {first.name}"
        if first.data_digests and member.data_digests:
            differing = sorted(
                name
                for name in set(first.data_digests) & set(member.data_digests)
                if first.data_digests[name] != member.data_digests[name]
            )
            if differing:
                raise BlendError(
                    f"{where} were trained on different data files: {', '.join(differing)} differ "
                    "(run_record.json's digests). Blend runs trained on the same data"
                )
        only_member = np.setdiff1d(member.sequence_ids, first.sequence_ids)
        only_first = np.setdiff1d(first.sequence_ids, member.sequence_ids)
        if len(only_member) or len(only_first):
            example = only_member[0] if len(only_member) else only_first[0]
            owner = member.name if len(only_member) else first.name
            raise BlendError(
                f"{where} were trained on different sequences: {example} is in {owner}'s OOF only "
                f"({len(only_member) + len(only_first)} such sequences). Blend runs of the same data files"
            )
        member = member.aligned_to(first.sequence_ids)
        for what, mine, theirs in (
            ("label", member.labels, first.labels),
            ("fold", member.folds, first.folds),
        ):
            differ = np.flatnonzero(mine != theirs)
            if len(differ):
                i = differ[0]
                shown = (
                    (GESTURES[mine[i]], GESTURES[theirs[i]])
                    if what == "label"
                    else (int(mine[i]), int(theirs[i]))
                )
                raise BlendError(
                    f"{where} differ in the {what} of sequence {first.sequence_ids[i]}: {shown[0]!r} "
                    f"against {shown[1]!r} ({len(differ)} sequences differ). "
                    + (
                        "Blend runs trained on the same folds (data.n_folds, data.fold_seed, folds.csv)"
                        if what == "fold"
                        else "Blend runs trained on the same data files"
                    )
                )
        aligned.append(member)
    return aligned


# ---------------------------------------------------------------- combining and fitting
def combine_probabilities(probabilities: np.ndarray, weights: np.ndarray, combine: str) -> np.ndarray:
    """``(N, C)`` blend of ``(M, N, C)`` member probabilities with ``(M,)`` simplex weights:
    ``mean`` = sum_i w_i p_i; ``log`` = softmax(sum_i w_i log max(p_i, floor))."""
    weights = np.asarray(weights, dtype=np.float64)
    if combine == "mean":
        return np.tensordot(weights, probabilities, axes=1)
    if combine == "log":
        logits = np.tensordot(weights, np.log(np.maximum(probabilities, PROBABILITY_FLOOR)), axes=1)
        logits -= logits.max(axis=-1, keepdims=True)
        blended = np.exp(logits)
        return blended / blended.sum(axis=-1, keepdims=True)
    raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")


def log_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log probability of the true class (floored at :data:`PROBABILITY_FLOOR`)."""
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.maximum(picked, PROBABILITY_FLOOR)).mean())


def fit_weights(
    probabilities: np.ndarray, labels: np.ndarray, combine: str, method: str = "log_loss"
) -> np.ndarray:
    """Simplex weights of ``(M, N, C)`` member probabilities for ``labels``: ``log_loss``
    (:func:`log_loss_weights`) or ``greedy`` (:func:`greedy_weights`)."""
    if probabilities.shape[0] == 1:
        return np.ones(1)
    if method == "log_loss":
        return log_loss_weights(probabilities, labels, combine)
    if method == "greedy":
        return greedy_weights(probabilities, labels, combine)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def log_loss_weights(probabilities: np.ndarray, labels: np.ndarray, combine: str) -> np.ndarray:
    """The simplex weights minimising :func:`log_loss` of :func:`combine_probabilities` (SLSQP from
    equal weights; the loss is convex in the weights for both combines)."""
    n_members = probabilities.shape[0]
    start = np.full(n_members, 1.0 / n_members)
    result = minimize(
        lambda w: log_loss(combine_probabilities(probabilities, w, combine), labels),
        start,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * n_members,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}],
        options={"maxiter": 200, "ftol": 1e-10},
    )
    weights = np.clip(result.x, 0.0, None)
    weights[weights < 1e-4] = 0.0  # a member at numerical noise is left out (no cost to serve it)
    return weights / weights.sum()


def greedy_weights(
    probabilities: np.ndarray, labels: np.ndarray, combine: str, steps: int = GREEDY_STEPS
) -> np.ndarray:
    """Ensemble selection (Caruana et al. 2004): ``steps`` times, add the member (with replacement)
    whose addition gives the best competition score of the combined OOF (ties: the lower log
    loss); the weights are the counts of the best-scoring prefix, over its length."""
    n_members = probabilities.shape[0]
    counts = np.zeros(n_members)
    best_counts, best_score = None, -math.inf
    for _ in range(steps):
        trials = []
        for member in range(n_members):
            trial = counts.copy()
            trial[member] += 1
            blended = combine_probabilities(probabilities, trial / trial.sum(), combine)
            score = score_of_indices(labels, blended.argmax(axis=1))
            trials.append((score, -log_loss(blended, labels), -member))
        score, _, negative_member = max(trials)
        counts[-negative_member] += 1
        if score > best_score:
            best_score, best_counts = score, counts.copy()
    return best_counts / best_counts.sum()


_IS_TARGET = np.array([g in TARGET_GESTURES for g in GESTURES])
_METRIC_CLASS = np.array([i if _IS_TARGET[i] else len(TARGET_GESTURES) for i in range(NUM_GESTURES)])


def score_of_indices(labels: np.ndarray, predicted: np.ndarray) -> float:
    """:func:`~codes.common.metric.competition_score` of gesture indices, from counts (the greedy
    fit scores thousands of candidates): binary F1 of Target, macro F1 over the 8 targets and
    ``non_target``, classes present in either list."""
    true_target, predicted_target = _IS_TARGET[labels], _IS_TARGET[predicted]
    true_positive = np.sum(true_target & predicted_target)
    wrong = np.sum(true_target != predicted_target)
    binary = 2 * true_positive / (2 * true_positive + wrong) if true_positive + wrong else 0.0
    true_class, predicted_class = _METRIC_CLASS[labels], _METRIC_CLASS[predicted]
    n_classes = len(TARGET_GESTURES) + 1
    hits = np.bincount(true_class[true_class == predicted_class], minlength=n_classes)
    true_counts = np.bincount(true_class, minlength=n_classes)
    predicted_counts = np.bincount(predicted_class, minlength=n_classes)
    present = (true_counts + predicted_counts) > 0
    f1 = 2 * hits[present] / (true_counts[present] + predicted_counts[present])
    return float(0.5 * binary + 0.5 * f1.mean())


def accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    return float((labels == predicted).mean())


def scores_of(probabilities: np.ndarray, labels: np.ndarray, folds: np.ndarray) -> dict[str, Any]:
    """The competition score and accuracy over all sequences (``score``, ``accuracy``) and per
    fold with their means (``fold_scores``, ``fold_accuracies``, ``fold_mean_score``,
    ``fold_mean_accuracy``)."""
    names = np.array(GESTURES)
    predicted = probabilities.argmax(axis=1)
    fold_scores, fold_accuracies = {}, {}
    for fold in np.unique(folds):
        rows = folds == fold
        fold_scores[str(fold)] = competition_score(names[labels[rows]], names[predicted[rows]])
        fold_accuracies[str(fold)] = accuracy(labels[rows], predicted[rows])
    return {
        "score": competition_score(names[labels], names[predicted]),
        "accuracy": accuracy(labels, predicted),
        "fold_scores": fold_scores,
        "fold_accuracies": fold_accuracies,
        "fold_mean_score": float(np.mean(list(fold_scores.values()))),
        "fold_mean_accuracy": float(np.mean(list(fold_accuracies.values()))),
        "log_loss": log_loss(probabilities, labels),
    }


def nested_blend(
    probabilities: np.ndarray, labels: np.ndarray, folds: np.ndarray, combine: str, method: str = "log_loss"
) -> tuple[np.ndarray, dict[str, list[float]]]:
    """``(N, C)`` answers where fold k's come from weights fitted on the other folds' OOF only,
    and those weights per fold."""
    blended = np.zeros(probabilities.shape[1:])
    weights_by_fold = {}
    for fold in np.unique(folds):
        held_out = folds == fold
        weights = fit_weights(probabilities[:, ~held_out], labels[~held_out], combine, method)
        blended[held_out] = combine_probabilities(probabilities[:, held_out], weights, combine)
        weights_by_fold[str(fold)] = weights.tolist()
    return blended, weights_by_fold


def fit_route(
    members: Sequence[MemberOOF], route: str, combine: str, method: str = "log_loss"
) -> dict[str, Any]:
    """One route's weights (fitted on all OOF: served) and its report: each member alone, equal
    weights, in-sample (optimistic) and nested CV, the nested per-fold weights."""
    probabilities = np.stack([m.probabilities[route] for m in members])
    labels, folds = members[0].labels, members[0].folds
    weights = fit_weights(probabilities, labels, combine, method)
    nested, weights_by_fold = nested_blend(probabilities, labels, folds, combine, method)
    equal = np.full(len(members), 1.0 / len(members))
    report = {
        "weights": weights.tolist(),
        "nested_weights": weights_by_fold,
        "members": {m.name: scores_of(p, labels, folds) for m, p in zip(members, probabilities, strict=True)},
        "equal_weights": scores_of(combine_probabilities(probabilities, equal, combine), labels, folds),
        "in_sample": scores_of(combine_probabilities(probabilities, weights, combine), labels, folds),
        "nested": scores_of(nested, labels, folds),
    }
    needing_all = [i for i, m in enumerate(members) if m.needs == "all_sensors"]
    if route == "imu_only" and 0 < len(needing_all) < len(members):
        subset = probabilities[needing_all]
        report["nested_all_sensor_members_only"] = scores_of(
            nested_blend(subset, labels, folds, combine, method)[0], labels, folds
        )
    return report


def relative_path(path: Path, start: Path) -> str:
    """``path`` relative to ``start`` (POSIX separators), or absolute when on another drive."""
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()
    except ValueError:
        return Path(path).resolve().as_posix()


METHOD_TEXT = {
    "log_loss": "simplex weights minimising the out-of-fold log loss (SLSQP from equal weights)",
    "greedy": f"ensemble selection: {GREEDY_STEPS} greedy additions with replacement maximising the "
    "out-of-fold competition score, the best prefix's counts as weights",
}


def fit_blend(
    members: Sequence[Path | MemberOOF], out_dir: Path, combine: str = "log", method: str = "greedy"
) -> dict[str, Any]:
    """Fit a blend of ``members`` (run folders, or their :func:`read_member_oof`) and write
    ``out_dir`` (``blend.json``, ``metrics.json``, ``config.yaml``); returns the blend's content.
    Refuses to write into a folder holding anything but a blend's files."""
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(p.name not in BLEND_FOLDER_FILES for p in out_dir.iterdir()):
        raise BlendError(f"{out_dir} holds files that are not a blend's: choose a new --out folder")
    members = check_members([m if isinstance(m, MemberOOF) else read_member_oof(Path(m)) for m in members])
    routes = {route: fit_route(members, route, combine, method) for route in ROUTES}
    blend = {
        "format": BLEND_FORMAT,
        "combine": combine,
        "method": method,
        "method_text": METHOD_TEXT[method]
        + "; nested CV: fold k answered with weights fitted on the other folds",
        "classes": list(GESTURES),
        "n_sequences": len(members[0].labels),
        "folds": sorted(int(k) for k in np.unique(members[0].folds)),
        "members": [
            {
                "name": m.name,
                "path": relative_path(m.run_dir, out_dir),
                "exp_name": m.exp_name,
                "needs": m.needs,
                "data": m.data_digests,
            }
            for m in members
        ],
        "routes": routes,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomically(blend, out_dir / BLEND_FILE)
    nested = {route: routes[route]["nested"] for route in ROUTES}
    metrics = {
        "overall": {
            "score": nested["all_sensors"]["score"],
            "score_imu_only": nested["imu_only"]["score"],
            "n_sequences": blend["n_sequences"],
            "nested": True,
        },
        "folds": {
            fold: {
                "score": nested["all_sensors"]["fold_scores"][fold],
                "score_imu_only": nested["imu_only"]["fold_scores"][fold],
            }
            for fold in nested["all_sensors"]["fold_scores"]
        },
    }
    write_json_atomically(metrics, out_dir / METRICS_FILE)
    write_blend_config(members[0].run_dir, out_dir)
    return blend


def write_blend_config(first_member: Path, out_dir: Path) -> None:
    """``config.yaml`` of the blend folder: ``exp_name: blend`` and the first member's ``data`` and
    ``paths`` sections (batch mode resolves ``data=auto|synthetic|competition`` with them)."""
    cfg = load_run_config(first_member).to_dict()
    config = {"exp_name": BLEND_EXP_NAME, "data": cfg.get("data", {}), "paths": cfg.get("paths", {})}
    with atomic_path(out_dir / CONFIG_FILE) as temporary:
        Path(temporary).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


# ---------------------------------------------------------------- reading and serving a blend
def check_route_weights(weights: object, n_members: int, where: str) -> np.ndarray:
    """``weights`` as ``(n_members,)`` floats, else a :class:`BlendError`: one per member, finite,
    none negative, summing to 1 (within :data:`WEIGHT_SUM_TOLERANCE`)."""
    try:
        values = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise BlendError(f"{where}: the weights are not a list of numbers: {weights!r}") from None
    if values.shape != (n_members,):
        raise BlendError(
            f"{where}: {values.size} weights for {n_members} members; give one weight per member"
        )
    if not np.isfinite(values).all():
        raise BlendError(f"{where}: the weights {values.tolist()} are not all finite")
    if (values < 0).any():
        raise BlendError(
            f"{where}: negative weight {values.min():g} (member {int(values.argmin())}); weights are >= 0"
        )
    if abs(values.sum() - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise BlendError(
            f"{where}: the weights sum to {values.sum():.9g}, not 1; a blend's weights must sum to 1 "
            "(fit it again with python -m codes.inference.blend fit, or correct the hand edit)"
        )
    return values


def read_blend_file(blend_dir: Path) -> dict[str, Any]:
    """``blend.json``, checked: format, members, combine, and each route's weights."""
    path = Path(blend_dir) / BLEND_FILE
    if not path.is_file():
        raise BlendError(
            f"{blend_dir} is not a blend folder: it has no {BLEND_FILE} (python -m codes.inference.blend fit writes one)"
        )
    try:
        blend = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise BlendError(f"{path} is damaged (not JSON: {str(error)[:200]})") from None
    if not isinstance(blend, dict) or blend.get("format") != BLEND_FORMAT:
        raise BlendError(f"{path} is not a blend file of format {BLEND_FORMAT}")
    members = blend.get("members")
    if (
        not isinstance(members, list)
        or not members
        or not all(isinstance(m, dict) and "path" in m for m in members)
    ):
        raise BlendError(f"{path} lists no members (each needs a path)")
    if blend.get("combine") not in COMBINES:
        raise BlendError(f"{path}: combine is {blend.get('combine')!r}, not one of {COMBINES}")
    if blend.get("classes") != list(GESTURES):
        raise BlendError(f"{path}: its class list is not the 18 gestures this code answers")
    routes = blend.get("routes")
    if not isinstance(routes, dict) or any(r not in routes for r in ROUTES):
        raise BlendError(f"{path} lacks the weights of the routes {ROUTES}")
    for route in ROUTES:
        check_route_weights(routes[route].get("weights"), len(members), f"{path}, route {route}")
    return blend


class BlendPredictor(GestureAnswerer):
    """Several runs' predictors, one input path: each sequence's probabilities are the members'
    combined with the weights of its route (``imu_only`` when no member that reads thermopiles or
    ToF finds a reading, else ``all_sensors``). A member whose output for a sequence is not finite
    is left out of that sequence's blend (the other weights renormalised). Heads other than the
    gesture's are blended when every member gives them (subject-aware pair level needs them)."""

    def __init__(
        self,
        members: Sequence[GestureAnswerer],
        names: Sequence[str],
        weights: Mapping[str, np.ndarray],
        combine: str,
        strict: bool = False,
        subject_assignment=None,
    ) -> None:
        settings: list[FeatureSettings] = [m.settings for m in members]
        inputs = InputPath(sensor_columns_of(settings), max(m.max_len for m in members), strict)
        super().__init__(inputs, subject_assignment)
        self.members = list(members)
        self.names = list(names)
        self.weights = {route: np.asarray(weights[route], dtype=np.float64) for route in ROUTES}
        self.combine = combine
        for member in self.members:  # one input path: the members' own checks are not run again
            member.inputs.strict = strict

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    @property
    def folds(self) -> list[int]:
        return sorted({k for m in self.members for k in m.folds})

    def _served(self) -> list[int]:
        """The members with a weight above 0 on some route (the others are not run)."""
        return [i for i in range(len(self.members)) if any(self.weights[r][i] > 0 for r in ROUTES)]

    def imu_only_of(self, clean: Clean) -> np.ndarray:
        readers = [m for m in self.members if m.settings.use_thm or m.settings.tof_mode != "none"]
        if not readers:  # no member reads them: every sequence is answered on the IMU-only route
            return np.ones(clean.n_sequences, dtype=bool)
        return np.logical_and.reduce([m.imu_only_of(clean) for m in readers])

    def clean_heads(
        self, clean: Clean, batch_size: int = 64, pad_to_max_len: bool = True
    ) -> dict[str, np.ndarray]:
        served = self._served()
        per_member = {i: self.members[i].clean_heads(clean, batch_size, pad_to_max_len) for i in served}
        imu_only = self.imu_only_of(clean)
        heads = [h for h in HEAD_OUTPUTS if all(h in per_member[i] for i in served)]
        n = len(imu_only)
        weights = np.stack(
            [np.where(imu_only, self.weights["imu_only"][i], self.weights["all_sensors"][i]) for i in served]
        )
        finite = np.stack([np.isfinite(per_member[i]["gesture"]).all(axis=1) for i in served])
        weights = np.where(finite, weights, 0.0)
        total = weights.sum(axis=0)
        answered = total > 0
        weights = np.divide(weights, total, out=np.zeros_like(weights), where=answered)
        result = {}
        for head in heads:
            stacked = np.stack([np.nan_to_num(per_member[i][head], nan=0.0) for i in served]).astype(
                np.float64
            )
            if self.combine == "mean":
                blended = np.einsum("mn,mnc->nc", weights, stacked)
            else:
                logits = np.einsum("mn,mnc->nc", weights, np.log(np.maximum(stacked, PROBABILITY_FLOOR)))
                logits -= logits.max(axis=1, keepdims=True)
                blended = np.exp(logits)
                blended /= blended.sum(axis=1, keepdims=True)
            blended[~answered] = np.nan
            result[head] = blended.astype(np.float32).reshape(n, -1)
        return result


def member_folder(blend_dir: Path, entry: Mapping[str, Any]) -> Path:
    """A member's run folder: its ``path`` in ``blend.json``, relative to the blend folder."""
    path = Path(entry["path"])
    return path if path.is_absolute() else Path(blend_dir) / path


def load_blend(
    blend_dir: str | Path,
    device: str | torch.device = "auto",
    strict: bool = False,
    subject_aware: bool | str | None = None,
    overflow_penalty: float = math.inf,
    joint: str = "auto",
    plain_until: int = 0,
    **options,
) -> BlendPredictor:
    """The blend folder's members, each with every fold it was fitted on, as one predictor.

    ``options`` go to every member's ``load_predictor`` (quantize, precision, num_threads,
    fold_threads). Subject-aware answers (``subject_aware``, as for a run) use the protocol of the
    first member that has one. A member folder that is missing or damaged, or that no longer holds
    the folds the blend was fitted on, is an error: the blend is never served without it.
    """
    from codes.inference.experiment import subject_assignment_of

    blend_dir = Path(blend_dir)
    blend = read_blend_file(blend_dir)
    predictors, names = [], []
    for entry in blend["members"]:
        run_dir = (
            (blend_dir / entry["path"]) if not Path(entry["path"]).is_absolute() else Path(entry["path"])
        )
        name = entry.get("name", entry["path"])
        try:
            if not run_dir.is_dir():
                raise RunFolderError(f"{run_dir} does not exist")
            if run_exp_name(run_dir) != entry.get("exp_name", run_exp_name(run_dir)):
                raise RunFolderError(
                    f"{run_dir} is a run of {run_exp_name(run_dir)}, but the blend was fitted on a run of "
                    f"{entry['exp_name']}"
                )
            predictor = load_member_predictor(
                run_dir, None, device, strict=strict, subject_aware=False, **options
            )
        except (RunFolderError, BlendError, FileNotFoundError) as error:
            raise BlendError(
                f"{blend_dir / BLEND_FILE}: member {name} cannot be served ({error}). The blend is never "
                "served without one of its members: copy the member's run folder again, or fit a new blend"
            ) from None
        if sorted(predictor.folds) != blend["folds"]:
            raise BlendError(
                f"member {name} serves folds {sorted(predictor.folds)}, but the blend was fitted on folds "
                f"{blend['folds']}"
            )
        predictors.append(predictor)
        names.append(name)
    assignment = None
    for entry in blend["members"]:
        run_dir = (
            (blend_dir / entry["path"]) if not Path(entry["path"]).is_absolute() else Path(entry["path"])
        )
        if (run_dir / "protocol.json").is_file():
            assignment = subject_assignment_of(run_dir, subject_aware, overflow_penalty, joint, plain_until)
            break
    weights = {route: np.asarray(blend["routes"][route]["weights"]) for route in ROUTES}
    predictor = BlendPredictor(predictors, names, weights, blend["combine"], strict, assignment)
    logger.info(
        "loaded blend %s: %s; weights all_sensors %s, imu_only %s (%s)",
        blend_dir,
        ", ".join(names),
        np.round(weights["all_sensors"], 3).tolist(),
        np.round(weights["imu_only"], 3).tolist(),
        blend["combine"],
    )
    return predictor


# ---------------------------------------------------------------- command line
def report_lines(blend: Mapping[str, Any]) -> list[str]:
    """A markdown table per route: each member, equal weights, in-sample and nested."""
    lines = []
    for route in ROUTES:
        report = blend["routes"][route]
        lines += [
            "",
            f"route {route} ({blend['combine']} combine, {blend['method']} weights)",
            "",
            "| model | weight | CV score | fold-mean score | fold-mean accuracy | log loss |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        rows = [
            (name, f"{w:.3f}", s)
            for (name, s), w in zip(report["members"].items(), report["weights"], strict=True)
        ]
        rows += [
            ("equal weights", "", report["equal_weights"]),
            ("in-sample (optimistic)", "", report["in_sample"]),
        ]
        if "nested_all_sensor_members_only" in report:
            rows.append(("nested, all-sensor members only", "", report["nested_all_sensor_members_only"]))
        rows.append(("**nested blend**", "", report["nested"]))
        for name, weight, s in rows:
            lines.append(
                f"| {name} | {weight} | {s['score']:.4f} | {s['fold_mean_score']:.4f} | "
                f"{s['fold_mean_accuracy']:.4f} | {s['log_loss']:.4f} |"
            )
    return lines


def compare_lines(members: Sequence[MemberOOF]) -> list[str]:
    """A markdown table: per route, combine and method, the best member alone, equal weights, the
    in-sample and the nested CV score (and fold-mean accuracy)."""
    lines = [
        "| route | combine | weights | best member | equal weights | in-sample | nested | nested - best | nested fold-mean accuracy |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for route in ROUTES:
        for combine in COMBINES:
            for method in METHODS:
                report = fit_route(members, route, combine, method)
                best = max(s["score"] for s in report["members"].values())
                lines.append(
                    f"| {route} | {combine} | {method} | {best:.4f} | {report['equal_weights']['score']:.4f} | "
                    f"{report['in_sample']['score']:.4f} | {report['nested']['score']:.4f} | "
                    f"{report['nested']['score'] - best:+.4f} | {report['nested']['fold_mean_accuracy']:.4f} |"
                )
    return lines


def main(argv: Sequence[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit", help="fit a blend of finished runs and write its folder")
    fit.add_argument("--members", nargs="+", type=Path, required=True, help="run folders")
    fit.add_argument("--out", type=Path, required=True, help="the blend folder to write")
    fit.add_argument("--combine", choices=COMBINES, default="log")
    fit.add_argument("--method", choices=METHODS, default="greedy", help="how the weights are fitted")
    fit.add_argument("--compare", action="store_true", help="also print every combine x method, nested")
    compare = commands.add_parser("compare", help="nested CV of every combine x method; nothing written")
    compare.add_argument("--members", nargs="+", type=Path, required=True, help="run folders")
    predict = commands.add_parser(
        "predict", help="batch mode: key=value settings as an experiment's inference.py"
    )
    predict.add_argument("settings", nargs="*")
    args = parser.parse_args(argv)
    setup_logging(None)
    if args.command == "compare":
        print("\n".join(compare_lines(check_members([read_member_oof(Path(d)) for d in args.members]))))
        return None
    if args.command == "fit":
        members = check_members([read_member_oof(Path(d)) for d in args.members])
        blend = fit_blend(members, args.out, args.combine, args.method)
        print("\n".join([f"blend written to {args.out}", *report_lines(blend)]))
        if args.compare:
            print("\n".join(["", *compare_lines(members)]))
        return blend
    from codes.inference.experiment import batch_main

    settings = [s.replace("blend_dir=", "run_dir=", 1) for s in args.settings]
    return batch_main(
        lambda run_dir, folds, device, **options: load_blend(run_dir, device, **options), "blend", settings
    )


if __name__ == "__main__":
    main()

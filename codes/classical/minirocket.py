"""MiniRocket + ridge: a classical run member with the run-folder outputs of a trained experiment.

    python -m codes.classical.minirocket data.source=synthetic run_name=synthetic-s0
    python -m codes.classical.minirocket data.source=competition paths.data_dir=data/real_imu \
        data.max_len=200 data.sampling_rate_hz=50 run_name=real_imu-s0
    python -m codes.classical.minirocket predict run_dir=outputs/minirocket/<run> data=synthetic
    python -m codes.classical.minirocket latency run_dir=outputs/minirocket/<run> data=synthetic
    python -m codes.classical.minirocket --help        # (predict --help, latency --help)

What a run computes, per fold of the folds training would use (``codes.common.folds.data_folds``:
the data folder's ``folds.csv`` when it has one, else ``data.n_folds`` / ``data.fold_seed``):

- **series**: the repository's own step features (``compute_step_features`` with
  ``FeatureSettings(use_thm=False, tof_mode="none", mirror_left_handed=True)``, so left-handed
  wearers are mirrored as in training) of the 6 :data:`CHANNELS` (acc in m/s^2, angular velocity
  in rad/s from the quaternions), as ``(N, 6, data.max_len)`` float32: the LAST ``data.max_len``
  steps of each sequence; a shorter sequence is LEFT-padded with zeros (its real steps end at the
  last position, as the gesture ends a sequence), so a sequence of any length, fewer than
  MiniRocket's 9 steps or none at all included, is answered. Non-finite values become 0.
- **model**: aeon's ``MiniRocket`` (``n_kernels`` features, ``random_state=seed``) fitted on the
  training folds, a ``StandardScaler``, then ``RidgeClassifierCV(alphas=logspace(-3, 3, 10))``
  (its leave-one-out choice of alpha: the mean squared error over the +-1 class targets).
- **probabilities**: ``softmax(decision / T)`` over the classes the training folds hold; the
  temperature ``T`` minimises the log loss of held-out decision values of the chosen alpha:
  ridges fitted without each training sequence's subject (``grouped_decisions``, up to 5
  subject-grouped splits of the training folds; the leave-one-out ones when the training folds
  hold one subject). Overlapping windows of one recording share a subject, so a window's
  decision never comes from a ridge that saw its neighbours (leave-one-out ones did, and gave
  temperatures 10-100x too small on the real wrist-IMU windows). The scaler is fitted on all of
  the training folds. Classes the training
  folds lack get probability 0; all 18 columns are always there, in ``GESTURES`` order.

The run folder ``<output_root>/minirocket/<run_name>/`` holds ``config.yaml``, ``run_record.json``
(the data files' digests, as training records them), ``overrides.txt``, ``git_commit.txt``,
``packages.txt``, ``train.log``, per fold ``fold{k}/model.npz`` (the fitted state as plain arrays,
no pickle: :data:`MODEL_KEYS`), and ``oof.parquet`` / ``metrics.json`` / plots in training's format
(``codes.common.training.write_outputs``; ``prob_imu_only_<gesture>`` = ``prob_<gesture>``: the
model reads the IMU only; per fold ``best_epoch`` 0, ``epochs`` 1). An existing non-empty run
folder is never overwritten.

Serving: :func:`load_predictor` gives a :class:`ClassicalPredictor`, a ``GestureAnswerer`` over
the shared input path (``codes.inference.input_path``): ``predict``, ``predict_frame`` and batch
mode answer as the neural members do, the folds' probabilities averaged. Needs ``aeon`` (and
``numba``) at training and inference time.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import torch

from codes.common.atomic_files import atomic_path, write_text_atomically
from codes.common.features import FeatureSettings
from codes.common.machine import PathsConfig, apply_num_threads
from codes.common.schema import GESTURES, NUM_GESTURES
from codes.common.sequences import SequenceTable
from codes.inference.experiment import parse_key_values, usage_error
from codes.inference.input_path import InputPath
from codes.inference.predictor import Clean, GestureAnswerer
from codes.inference.run_folder import (
    RunFolderError,
    check_config_against_record,
    expected_folds,
    load_run_config,
)

if TYPE_CHECKING:
    from omegaconf import DictConfig

logger = logging.getLogger(__name__)

EXP_NAME = "minirocket"  # the run folders' exp_name: <output_root>/minirocket/<run_name>/
MODEL_KIND = "minirocket_ridge"
MODEL_FILE = "model.npz"
MODEL_FORMAT_VERSION = 1
CHANNELS = [
    "acc_x",
    "acc_y",
    "acc_z",
    "angular_velocity_x",
    "angular_velocity_y",
    "angular_velocity_z",
]
ALPHAS = np.logspace(-3, 3, 10)  # RidgeClassifierCV's alphas
MAX_DILATIONS_PER_KERNEL = 32  # aeon's default
MIN_TIMEPOINTS = 9  # MiniRocket's kernels are 9 steps long: data.max_len must be at least this
MIN_KERNELS = 84  # aeon uses at least 84 kernels, a multiple of 84
LOG_TEMPERATURE_BOUNDS = (math.log(1e-3), math.log(1e3))
PROBABILITY_FLOOR = 1e-12  # log loss of a class given probability 0 (a class the fold never saw)
# the 5 arrays of aeon's fitted ``MiniRocket.parameters`` tuple, in its order (npz keys: minirocket_<name>)
PARAMETER_NAMES = (
    "n_channels_per_combination",
    "channel_indices",
    "dilations",
    "n_features_per_dilation",
    "biases",
)
PARAMETER_DTYPES = (np.int32, np.int32, np.int32, np.int32, np.float32)
MODEL_KEYS = (
    "format_version",
    "kind",
    "channels",
    *(f"minirocket_{name}" for name in PARAMETER_NAMES),
    "n_channels",
    "n_timepoints",
    "n_kernels",
    "max_dilations_per_kernel",
    "seed",
    "scaler_mean",
    "scaler_scale",
    "ridge_coef",
    "ridge_intercept",
    "ridge_alpha",
    "classes",
    "temperature",
)
# load_predictor's options that only the neural members use: accepted, without effect here
NEURAL_OPTIONS = ("quantize", "precision", "fold_threads", "overflow_penalty", "joint", "plain_until")


class ModelFileError(RunFolderError):
    """A fold's ``model.npz`` is missing, damaged or inconsistent; the message names the file."""


# ---------------------------------------------------------------- series
def feature_settings(sampling_rate_hz: float = 10.0) -> FeatureSettings:
    """The step features the series are taken from: IMU only, left-handed wearers mirrored."""
    return FeatureSettings(
        use_thm=False, tof_mode="none", mirror_left_handed=True, sampling_rate_hz=float(sampling_rate_hz)
    )


def sequence_series(table: SequenceTable, max_len: int, channels: Sequence[str] = CHANNELS) -> np.ndarray:
    """``(N, C, max_len)`` float32 series of ``table``'s ``channels``: the LAST ``max_len`` steps of
    each sequence, a shorter one left-padded with zeros (its last step at the last position; an
    empty sequence is all zeros); non-finite values are 0."""
    if isinstance(max_len, bool) or int(max_len) != max_len or max_len < 1:
        raise ValueError(f"max_len must be a whole number >= 1, got {max_len!r}")
    max_len = int(max_len)
    missing = [c for c in channels if c not in table.feature_names]
    if missing:
        raise ValueError(
            f"the sequence table has no feature {missing}; its features are {table.feature_names}"
        )
    columns = [table.feature_names.index(c) for c in channels]
    values = table.features[:, columns]  # (R, C)
    kept = np.minimum(table.lengths, max_len)  # (N,)
    positions = np.arange(max_len)
    real = positions[None, :] >= (max_len - kept)[:, None]  # (N, L): True on the kept steps
    rows = np.where(real, table.offsets[1:, None] - max_len + positions[None, :], 0)  # (N, L)
    if len(values) == 0:
        series = np.zeros((table.n_sequences, max_len, len(columns)), dtype=np.float32)
    else:
        series = values[rows].astype(np.float32)  # (N, L, C)
        series[~real] = 0.0
    series = np.nan_to_num(series, nan=0.0, posinf=0.0, neginf=0.0)
    return np.ascontiguousarray(series.transpose(0, 2, 1))  # (N, L, C) -> (N, C, L)


# ---------------------------------------------------------------- probabilities
def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``(N, K)`` values (float64)."""
    from scipy.special import softmax as scipy_softmax

    return scipy_softmax(np.asarray(logits, dtype=np.float64), axis=1)


def temperature_log_loss(decisions: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    """Mean log loss of ``softmax(decisions / temperature)`` ``(N, K)`` for the columns ``targets``."""
    from scipy.special import log_softmax

    log_p = log_softmax(np.asarray(decisions, dtype=np.float64) / float(temperature), axis=1)
    return float(-log_p[np.arange(len(targets)), np.asarray(targets)].mean())


def fit_temperature(decisions: np.ndarray, targets: np.ndarray) -> float:
    """The ``T`` minimising :func:`temperature_log_loss` (searched on log T within
    :data:`LOG_TEMPERATURE_BOUNDS`): fitted on leave-one-out decision values, it turns ridge
    scores (on the +-1 target scale) into calibrated probabilities."""
    from scipy.optimize import minimize_scalar

    decisions = np.asarray(decisions, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if len(targets) == 0:
        raise ValueError("fitting a temperature needs at least one sequence")
    result = minimize_scalar(
        lambda log_t: temperature_log_loss(decisions, targets, math.exp(log_t)),
        bounds=LOG_TEMPERATURE_BOUNDS,
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(math.exp(result.x))


def log_loss_of(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean log loss of ``(N, 18)`` probabilities for gesture indices ``labels`` (0 -> a floor)."""
    chosen = np.asarray(probabilities, dtype=np.float64)[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.log(np.maximum(chosen, PROBABILITY_FLOOR)).mean())


def standardize(features: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(features - mean) / scale`` in float64: a fitted StandardScaler's transform, the one code
    path of training and inference."""
    return (np.asarray(features, dtype=np.float64) - mean) / scale


def fit_ridge(
    features: np.ndarray, labels: np.ndarray, alphas: np.ndarray = ALPHAS
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, np.ndarray]:
    """``RidgeClassifierCV`` on standardised features ``(N, F)`` and gesture indices ``labels``.

    Returns ``(coef (K, F), intercept (K,), alpha, classes (K,), leave-one-out decision values
    (N, K))`` for the K classes of ``labels``; two classes are written as two columns, ``[-d, d]``
    (``softmax`` of them is the sigmoid of the ridge's one score). Alpha is chosen as
    ``RidgeClassifierCV`` chooses it by default (the mean squared leave-one-out error over the +-1
    targets); the scorer below computes that same number from the leave-one-out decision values,
    which sklearn stores (``cv_results_``) only when a scorer is given.
    """
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.preprocessing import LabelBinarizer

    labels = np.asarray(labels, dtype=np.int64)
    if len(np.unique(labels)) < 2:
        raise ValueError(
            f"the training folds hold only gesture {GESTURES[int(labels[0])] if len(labels) else '(none)'}: "
            "a classifier needs at least 2 gestures to train on"
        )
    targets = LabelBinarizer(pos_label=1, neg_label=-1).fit_transform(labels).astype(np.float64)  # (N, K|1)

    def mean_squared_error_score(
        _estimator: Any, predictions: np.ndarray, _classes: Any, **_params: Any
    ) -> float:
        return -float(np.mean((targets - np.reshape(predictions, targets.shape)) ** 2))

    ridge = RidgeClassifierCV(alphas=alphas, scoring=mean_squared_error_score, store_cv_results=True)
    ridge.fit(features, labels)
    best = int(np.argmin(np.abs(np.log(np.asarray(alphas, dtype=np.float64)) - math.log(ridge.alpha_))))
    loo = np.asarray(ridge.cv_results_, dtype=np.float64)  # (N, K|1, n_alphas)
    loo = loo.reshape(len(labels), -1, len(alphas))[:, :, best]
    coef = np.atleast_2d(np.asarray(ridge.coef_, dtype=np.float64))
    intercept = np.atleast_1d(np.asarray(ridge.intercept_, dtype=np.float64))
    if coef.shape[0] == 1:  # two classes: one score d for classes_[1]; as columns [-d, d]
        coef, intercept, loo = (
            np.vstack([-coef, coef]),
            np.concatenate([-intercept, intercept]),
            np.hstack([-loo, loo]),
        )
    return coef, intercept, float(ridge.alpha_), np.asarray(ridge.classes_, dtype=np.int64), loo


# ---------------------------------------------------------------- one fold's model
@dataclass
class MiniRocketRidge:
    """One fold's fitted MiniRocket + StandardScaler + ridge + temperature, as plain arrays."""

    parameters: tuple[np.ndarray, ...]  # aeon's MiniRocket.parameters (PARAMETER_NAMES)
    n_channels: int
    n_timepoints: int
    n_kernels: int  # aeon's n_kernels_ (the kernels used; the number of features)
    seed: int
    scaler_mean: np.ndarray  # (F,)
    scaler_scale: np.ndarray  # (F,)
    coef: np.ndarray  # (K, F)
    intercept: np.ndarray  # (K,)
    alpha: float
    classes: np.ndarray  # (K,) int64 gesture indices into GESTURES
    temperature: float
    channels: list[str] = field(default_factory=lambda: list(CHANNELS))
    max_dilations_per_kernel: int = MAX_DILATIONS_PER_KERNEL
    _transformer: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def n_features(self) -> int:
        return len(self.parameters[4])

    def transformer(self):
        """aeon's ``MiniRocket`` restored from :attr:`parameters` (built once), as fitting left it."""
        if self._transformer is None:
            from aeon.transformations.collection.convolution_based import MiniRocket

            transform = MiniRocket(
                n_kernels=self.n_kernels,
                max_dilations_per_kernel=self.max_dilations_per_kernel,
                n_jobs=1,
                random_state=self.seed,
            )
            transform.parameters = tuple(self.parameters)
            transform.n_kernels_ = self.n_kernels
            transform._n_jobs = 1
            transform.metadata_ = {
                "multivariate": self.n_channels > 1,
                "missing_values": False,
                "unequal_length": False,
                "n_cases": 1,
                "n_channels": self.n_channels,
                "n_timepoints": self.n_timepoints,
            }
            transform.is_fitted = True
            self._transformer = transform
        return self._transformer

    def features(self, series: np.ndarray) -> np.ndarray:
        """``(N, C, L)`` series -> ``(N, F)`` float32 MiniRocket features."""
        series = np.ascontiguousarray(series, dtype=np.float32)
        if series.ndim != 3 or series.shape[1:] != (self.n_channels, self.n_timepoints):
            raise ValueError(
                f"series of shape {series.shape}, the model was fitted on (N, {self.n_channels}, {self.n_timepoints})"
            )
        if len(series) == 0:
            return np.zeros((0, self.n_features), dtype=np.float32)
        # aeon sets numba's thread count and back to numba's own default, which (OpenMP layer) is
        # also torch's: the torch threads the process chose are restored after the transform
        torch_threads = torch.get_num_threads()
        try:
            return np.asarray(self.transformer().transform(series), dtype=np.float32)
        finally:
            torch.set_num_threads(torch_threads)

    def standardized(self, features: np.ndarray) -> np.ndarray:
        """The StandardScaler's transform, in float64."""
        return standardize(features, self.scaler_mean, self.scaler_scale)

    def decisions(self, series: np.ndarray) -> np.ndarray:
        """``(N, K)`` ridge decision values of the fold's classes."""
        return self.standardized(self.features(series)) @ self.coef.T + self.intercept

    def probabilities(self, series: np.ndarray) -> np.ndarray:
        """``(N, 18)`` float64: ``softmax(decision / T)`` in the fold's classes' columns, 0 elsewhere."""
        return self.spread(softmax(self.decisions(series) / self.temperature))

    def spread(self, class_probabilities: np.ndarray) -> np.ndarray:
        """``(N, K)`` probabilities of :attr:`classes` as ``(N, 18)`` in ``GESTURES`` order."""
        out = np.zeros((len(class_probabilities), NUM_GESTURES), dtype=np.float64)
        out[:, self.classes] = class_probabilities
        return out

    # ------------------------------------------------------------ the npz file
    def arrays(self) -> dict[str, np.ndarray]:
        """The :data:`MODEL_KEYS` arrays (numbers and text only: loadable with ``allow_pickle=False``)."""
        arrays = {
            "format_version": np.array(MODEL_FORMAT_VERSION, dtype=np.int64),
            "kind": np.array(MODEL_KIND),
            "channels": np.array(self.channels, dtype=str),
            "n_channels": np.array(self.n_channels, dtype=np.int64),
            "n_timepoints": np.array(self.n_timepoints, dtype=np.int64),
            "n_kernels": np.array(self.n_kernels, dtype=np.int64),
            "max_dilations_per_kernel": np.array(self.max_dilations_per_kernel, dtype=np.int64),
            "seed": np.array(self.seed, dtype=np.int64),
            "scaler_mean": np.asarray(self.scaler_mean, dtype=np.float64),
            "scaler_scale": np.asarray(self.scaler_scale, dtype=np.float64),
            "ridge_coef": np.asarray(self.coef, dtype=np.float64),
            "ridge_intercept": np.asarray(self.intercept, dtype=np.float64),
            "ridge_alpha": np.array(self.alpha, dtype=np.float64),
            "classes": np.asarray(self.classes, dtype=np.int64),
            "temperature": np.array(self.temperature, dtype=np.float64),
        }
        for name, dtype, value in zip(PARAMETER_NAMES, PARAMETER_DTYPES, self.parameters, strict=True):
            arrays[f"minirocket_{name}"] = np.asarray(value, dtype=dtype)
        return arrays

    def save(self, path: Path) -> Path:
        """Write :meth:`arrays` to ``path`` atomically (never half a file)."""
        path = Path(path)
        with atomic_path(path) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, **self.arrays())
        return path

    @classmethod
    def load(cls, path: Path) -> MiniRocketRidge:
        """A fold's model from its ``model.npz`` (``allow_pickle=False``); a missing, damaged or
        inconsistent file is a :class:`ModelFileError` naming it."""
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(
                f"missing {path}: the fold's fitted MiniRocket + ridge. Copy it again from the original run "
                "folder, train the run again, or pass folds=[...] without this fold"
            )
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:
            raise ModelFileError(
                f"{path} is damaged ({path.stat().st_size} bytes; {type(error).__name__}: "
                f"{(str(error).splitlines() or [''])[0][:200]}): it must be the npz of arrays training wrote "
                "(no pickled objects). Copy it again from the original run folder, or train the run again"
            ) from None
        missing = [key for key in MODEL_KEYS if key not in arrays]
        if missing:
            raise ModelFileError(
                f"{path} lacks {', '.join(missing)}: not a complete {MODEL_KIND} model of this code. Copy it "
                "again from the original run folder, or train the run again"
            )
        try:
            model = cls._from_arrays(arrays)
        except (TypeError, ValueError, IndexError) as error:
            raise ModelFileError(f"{path} is inconsistent ({error}); train the run again") from None
        return model

    @classmethod
    def _from_arrays(cls, arrays: dict[str, np.ndarray]) -> MiniRocketRidge:
        def scalar(key: str) -> float:
            value = arrays[key]
            if value.shape != () or value.dtype.kind not in "iuf":
                raise ValueError(
                    f"{key} must be one number, got an array of shape {value.shape} ({value.dtype})"
                )
            return value.item()

        if int(scalar("format_version")) != MODEL_FORMAT_VERSION or str(arrays["kind"]) != MODEL_KIND:
            raise ValueError(
                f"format {arrays['format_version']} / kind {arrays['kind']}, expected {MODEL_FORMAT_VERSION} / {MODEL_KIND}"
            )
        parameters = tuple(
            np.asarray(arrays[f"minirocket_{name}"], dtype=dtype)
            for name, dtype in zip(PARAMETER_NAMES, PARAMETER_DTYPES, strict=True)
        )
        model = cls(
            parameters=parameters,
            n_channels=int(scalar("n_channels")),
            n_timepoints=int(scalar("n_timepoints")),
            n_kernels=int(scalar("n_kernels")),
            seed=int(scalar("seed")),
            scaler_mean=np.asarray(arrays["scaler_mean"], dtype=np.float64),
            scaler_scale=np.asarray(arrays["scaler_scale"], dtype=np.float64),
            coef=np.asarray(arrays["ridge_coef"], dtype=np.float64),
            intercept=np.asarray(arrays["ridge_intercept"], dtype=np.float64),
            alpha=float(scalar("ridge_alpha")),
            classes=np.asarray(arrays["classes"], dtype=np.int64),
            temperature=float(scalar("temperature")),
            channels=[str(c) for c in np.atleast_1d(arrays["channels"])],
            max_dilations_per_kernel=int(scalar("max_dilations_per_kernel")),
        )
        model.check()
        return model

    def check(self) -> None:
        """A ``ValueError`` naming the first array whose shape or values do not fit the others."""
        n_features, n_classes = self.n_features, len(self.classes)
        problems = [
            (len(self.channels) != self.n_channels, f"{len(self.channels)} channels named, n_channels {self.n_channels}"),
            (self.n_timepoints < MIN_TIMEPOINTS, f"n_timepoints {self.n_timepoints} < {MIN_TIMEPOINTS}"),
            (self.scaler_mean.shape != (n_features,), f"scaler_mean {self.scaler_mean.shape}, {n_features} features"),
            (self.scaler_scale.shape != (n_features,), f"scaler_scale {self.scaler_scale.shape}, {n_features} features"),
            (self.coef.shape != (n_classes, n_features), f"ridge_coef {self.coef.shape}, expected ({n_classes}, {n_features})"),
            (self.intercept.shape != (n_classes,), f"ridge_intercept {self.intercept.shape}, {n_classes} classes"),
            (n_classes < 2 or len(np.unique(self.classes)) != n_classes, f"classes {self.classes.tolist()}"),
            (bool(((self.classes < 0) | (self.classes >= NUM_GESTURES)).any()), f"classes {self.classes.tolist()}"),
            (not (math.isfinite(self.temperature) and self.temperature > 0), f"temperature {self.temperature}"),
            (not np.isfinite(self.coef).all() or not np.isfinite(self.intercept).all(), "non-finite ridge weights"),
            (not (np.isfinite(self.scaler_scale).all() and (self.scaler_scale > 0).all()), "scaler_scale not > 0"),
            (int(self.parameters[3].sum()) * MIN_KERNELS != n_features,
             f"{n_features} biases for {int(self.parameters[3].sum())} features per kernel"),
            (len(self.parameters[0]) != MIN_KERNELS * len(self.parameters[2]),
             f"{len(self.parameters[0])} channel combinations for {len(self.parameters[2])} dilations"),
            (int(self.parameters[0].sum()) != len(self.parameters[1]),
             f"{len(self.parameters[1])} channel indices for {int(self.parameters[0].sum())} channels in combinations"),
            (len(self.parameters[1]) > 0 and not 0 <= int(self.parameters[1].min()) <= int(self.parameters[1].max()) < self.n_channels,
             "channel indices outside 0..n_channels-1"),
        ]  # fmt: skip
        for broken, what in problems:
            if broken:
                raise ValueError(what)


TEMPERATURE_GROUP_SPLITS = 5  # subject-grouped splits whose held-out decisions fit the temperature


def grouped_decisions(
    features: np.ndarray, labels: np.ndarray, groups: np.ndarray, alpha: float, classes: np.ndarray
) -> np.ndarray | None:
    """``(N, K)`` decision values of a ridge (``alpha``) fitted without each sample's subject group
    (``GroupKFold``, up to :data:`TEMPERATURE_GROUP_SPLITS` splits), in ``classes`` columns; None
    with fewer than 2 groups. Overlapping windows of one recording share a subject, so these
    decisions do not see their own recording, as leave-one-out ones do."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.model_selection import GroupKFold

    n_groups = len(np.unique(groups))
    if n_groups < 2:
        return None
    decisions = np.zeros((len(labels), len(classes)))
    for train, held_out in GroupKFold(min(TEMPERATURE_GROUP_SPLITS, n_groups)).split(
        features, labels, groups
    ):
        if len(np.unique(labels[train])) < 2:
            return None
        ridge = RidgeClassifier(alpha=alpha).fit(features[train], labels[train])
        scores = np.atleast_2d(ridge.decision_function(features[held_out]).T).T
        if scores.shape[1] == 1:  # two classes: one score for classes_[1]
            scores = np.hstack([-scores, scores])
        columns = np.searchsorted(classes, ridge.classes_)
        decisions[np.ix_(held_out, columns)] = scores
        missing = np.setdiff1d(np.arange(len(classes)), columns)
        decisions[np.ix_(held_out, missing)] = scores.min() - 1.0  # a class the split never saw
    return decisions


def fit_fold(
    series: np.ndarray,
    labels: np.ndarray,
    n_kernels: int = 10_000,
    seed: int = 0,
    alphas: np.ndarray = ALPHAS,
    groups: np.ndarray | None = None,
) -> tuple[MiniRocketRidge, dict[str, float]]:
    """One fold's :class:`MiniRocketRidge` from training series ``(N, C, L)`` and gesture indices,
    and what the fit found (``alpha``, ``temperature``, ``train_loss``: the log loss of the
    held-out probabilities at that temperature, ``n_features``).

    The temperature is fitted on decision values of samples the ridge did not see: with ``groups``
    (the training sequences' subjects) those of ridges fitted without the sample's subject
    (:func:`grouped_decisions`), else the leave-one-out ones (which overlapping windows of one
    recording make overconfident)."""
    from aeon.transformations.collection.convolution_based import MiniRocket
    from sklearn.preprocessing import StandardScaler

    series = np.ascontiguousarray(series, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    _, n_channels, n_timepoints = series.shape
    if n_timepoints < MIN_TIMEPOINTS:
        raise ValueError(
            f"series of {n_timepoints} steps: MiniRocket needs at least {MIN_TIMEPOINTS} (data.max_len)"
        )
    transform = MiniRocket(
        n_kernels=int(n_kernels),
        max_dilations_per_kernel=MAX_DILATIONS_PER_KERNEL,
        n_jobs=1,
        random_state=int(seed),
    )
    features = np.asarray(transform.fit_transform(series), dtype=np.float64)
    scaler = StandardScaler().fit(features)
    mean, scale = np.asarray(scaler.mean_, dtype=np.float64), np.asarray(scaler.scale_, dtype=np.float64)
    coef, intercept, alpha, classes, loo = fit_ridge(standardize(features, mean, scale), labels, alphas)
    targets = np.searchsorted(classes, labels)
    if groups is not None:
        grouped = grouped_decisions(
            standardize(features, mean, scale), labels, np.asarray(groups), alpha, classes
        )
        loo = loo if grouped is None else grouped
    temperature = fit_temperature(loo, targets)
    model = MiniRocketRidge(
        parameters=tuple(
            np.asarray(p, dtype=d) for p, d in zip(transform.parameters, PARAMETER_DTYPES, strict=True)
        ),
        n_channels=int(n_channels),
        n_timepoints=int(n_timepoints),
        n_kernels=int(transform.n_kernels_),
        seed=int(seed),
        scaler_mean=mean,
        scaler_scale=scale,
        coef=coef,
        intercept=intercept,
        alpha=alpha,
        classes=classes,
        temperature=temperature,
    )
    model.check()
    info = {
        "alpha": alpha,
        "temperature": temperature,
        "train_loss": temperature_log_loss(loo, targets, temperature),
        "train_loss_t1": temperature_log_loss(loo, targets, 1.0),
        "n_features": model.n_features,
    }
    return model, info


# ---------------------------------------------------------------- the predictor
@dataclass
class ClassicalFold:
    """One fold of a classical run: its fold number and model."""

    fold: int
    model: MiniRocketRidge


class ClassicalPredictor(GestureAnswerer):
    """The folds of a MiniRocket run, their probabilities averaged; answers like
    ``EnsemblePredictor`` through the shared input path (``predict``, ``predict_frame``).

    Every sequence is fed at ``max_len`` steps (MiniRocket's dilations are fitted to that length),
    whatever ``pad_to_max_len`` says. Each sequence is answered alone (no subject-aware answers:
    the model has no orientation or pair heads).
    """

    def __init__(
        self, members: Sequence[ClassicalFold], settings: FeatureSettings, max_len: int, strict: bool = False
    ) -> None:
        if not members:
            raise ValueError("a classical predictor needs at least one fold model")
        super().__init__(InputPath(settings.sensor_columns, max_len, strict), None)
        self.members = list(members)
        self.settings = settings
        self.max_len = int(max_len)
        self.device = torch.device("cpu")
        for member in self.members:
            model = member.model
            if model.n_timepoints != self.max_len or model.channels != list(CHANNELS):
                raise ValueError(
                    f"fold {member.fold}: the model reads {model.channels} over {model.n_timepoints} steps, "
                    f"the predictor feeds {CHANNELS} over max_len={self.max_len}"
                )

    @property
    def folds(self) -> list[int]:
        return [m.fold for m in self.members]

    def restricted_to(self, folds: Sequence[int]) -> ClassicalPredictor:
        """The same predictor with only the given folds' models."""
        chosen = [m for m in self.members if m.fold in set(folds)]
        missing = sorted(set(folds) - {m.fold for m in chosen})
        if missing:
            raise ValueError(f"the predictor has no fold {missing}; it holds folds {self.folds}")
        return ClassicalPredictor(chosen, self.settings, self.max_len, self.strict)

    def clean_heads(
        self, clean: Clean, batch_size: int = 64, pad_to_max_len: bool = True
    ) -> dict[str, np.ndarray]:
        return {"gesture": self.table_probabilities(clean.table(self.settings), batch_size)}

    def imu_only_of(self, clean: Clean) -> np.ndarray:
        return clean.table(self.settings).imu_only

    def sequence_table(self, sequence, demographics) -> SequenceTable:
        """The one-sequence :class:`SequenceTable` training would have built from these rows."""
        return self.inputs.clean_sequence(sequence, demographics).table(self.settings)

    def table_probabilities(self, table: SequenceTable, batch_size: int = 64) -> np.ndarray:
        """``(N, 18)`` float32: the folds' probabilities of every sequence of ``table``, averaged
        (a fold whose answer for a sequence is not finite is left out of its mean, with a warning;
        a sequence no fold answers gets NaN)."""
        series = sequence_series(table, self.max_len)
        step = max(1, int(batch_size))
        totals = np.zeros((table.n_sequences, NUM_GESTURES), dtype=np.float64)
        counts = np.zeros(table.n_sequences, dtype=np.int64)
        for member in self.members:
            probabilities = np.concatenate(
                [
                    member.model.probabilities(series[start : start + step])
                    for start in range(0, len(series), step)
                ]
                or [np.zeros((0, NUM_GESTURES))]
            )
            good = np.isfinite(probabilities).all(axis=1)
            if not good.all():
                logger.warning(
                    "fold %d gave non-finite probabilities for %d sequence(s) (%s): left out of their mean",
                    member.fold, int((~good).sum()), ", ".join(map(str, table.sequence_ids[~good][:5])),
                )  # fmt: skip
            totals[good] += probabilities[good]
            counts += good
        with np.errstate(invalid="ignore", divide="ignore"):
            return (totals / counts[:, None]).astype(np.float32)

    def warm_up(self) -> None:
        """Compile MiniRocket's transform (numba) now rather than in the first ``predict``."""
        model = self.members[0].model
        model.features(np.zeros((1, model.n_channels, model.n_timepoints), dtype=np.float32))


def model_path(run_dir: Path, fold: int) -> Path:
    return Path(run_dir) / f"fold{int(fold)}" / MODEL_FILE


def select_model_folds(run_dir: Path, folds: Iterable[int] | None = None) -> list[int]:
    """``folds`` (default: the run's folds: ``ensemble.json``, ``metrics.json``, else the config's
    ``data.n_folds``), each with its ``fold{k}/model.npz``; a missing one is a :class:`ModelFileError`
    naming the file."""
    run_dir = Path(run_dir)
    if folds is None:
        expected = expected_folds(run_dir)
        if expected is None:
            wanted = sorted(
                int(p.parent.name[4:])
                for p in run_dir.glob(f"fold*/{MODEL_FILE}")
                if p.parent.name[4:].isdigit()
            )
            source = "the fold folders it holds"
        else:
            wanted, source = expected
        if not wanted:
            raise RunFolderError(f"{run_dir} holds no fold{{k}}/{MODEL_FILE}: has its training finished?")
    else:
        wanted, source = [int(k) for k in folds], "folds=[...]"
        if not wanted:
            raise ValueError("folds must name at least one fold")
        twice = sorted({k for k in wanted if wanted.count(k) > 1})
        if twice:
            raise ValueError(f"folds={wanted} names fold {twice} more than once; name each fold once")
    missing = [model_path(run_dir, k) for k in wanted if not model_path(run_dir, k).is_file()]
    if missing:
        raise ModelFileError(
            f"missing {', '.join(map(str, missing))}: the run's folds are {wanted} ({source}). Copy the file "
            "again from the original run folder, or pass folds=[...] naming the folds it holds"
        )
    return wanted


def load_predictor(
    run_dir: str | Path,
    folds: Iterable[int] | None = None,
    device: str | torch.device = "cpu",
    strict: bool = False,
    num_threads: int | None = None,
    subject_aware: bool | str | None = None,
    **ignored_options: Any,
) -> ClassicalPredictor:
    """Every fold of a MiniRocket run folder (or only ``folds``) as one :class:`ClassicalPredictor`.

    Runs on the CPU whatever ``device`` says. ``num_threads``: ``torch.set_num_threads`` (the
    shared preprocessing); MiniRocket's transform runs in one thread. ``subject_aware``: only
    False, None or ``"pairs"`` (the model has no pair heads: plain answers either way; True raises).
    The neural members' options (:data:`NEURAL_OPTIONS`) are accepted and have no effect.
    """
    if num_threads is not None:
        if isinstance(num_threads, bool) or int(num_threads) != num_threads or num_threads < 1:
            raise ValueError(f"num_threads must be a positive whole number or None, got {num_threads!r}")
        apply_num_threads(int(num_threads))
    if subject_aware not in (None, False, "pairs"):
        raise ValueError(
            f"subject_aware={subject_aware!r}: a {EXP_NAME} run has no orientation or pair heads, so it answers "
            "each sequence alone; pass subject_aware=False (or None, or 'pairs', which answer plain here)"
        )
    if subject_aware == "pairs":
        logger.info("%s: no pair heads (a %s run): each sequence is answered alone", run_dir, EXP_NAME)
    unknown = sorted(set(ignored_options) - set(NEURAL_OPTIONS))
    if unknown:
        logger.warning("load_predictor(%s): options %s are not known; ignored", run_dir, unknown)
    if str(device) not in ("cpu", "auto"):
        logger.info("%s: a %s run runs on the CPU (device=%s ignored)", run_dir, EXP_NAME, device)
    started = time.perf_counter()
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if cfg.get("exp_name") != EXP_NAME or cfg.get("model", {}).get("kind") != MODEL_KIND:
        raise RunFolderError(
            f"{run_dir} holds a run of {cfg.get('exp_name')!r}, not a {EXP_NAME} run "
            f"(model.kind {MODEL_KIND}); load it with codes/exp/{cfg.get('exp_name')}/inference.py"
        )
    check_config_against_record(run_dir, cfg)
    if list(cfg.model.channels) != list(CHANNELS):
        raise RunFolderError(
            f"{run_dir}: model.channels {list(cfg.model.channels)}, this code reads {CHANNELS}"
        )
    members = [
        ClassicalFold(k, MiniRocketRidge.load(model_path(run_dir, k)))
        for k in select_model_folds(run_dir, folds)
    ]
    predictor = ClassicalPredictor(
        members, feature_settings(cfg.data.sampling_rate_hz), cfg.data.max_len, strict
    )
    predictor.warm_up()
    logger.info(
        "loaded %s folds %s (%s, %d features) in %.2f s",
        run_dir, predictor.folds, MODEL_KIND, members[0].model.n_features, time.perf_counter() - started,
    )  # fmt: skip
    return predictor


# ---------------------------------------------------------------- settings (key=value)
@dataclass
class DataSettings:
    source: str = field(
        default="auto", metadata={"help": "auto | competition | synthetic (resolved as training does)"}
    )
    synthetic_subjects: int = field(
        default=20, metadata={"help": "subjects of a synthetic data set generated on first use"}
    )
    synthetic_seed: int = field(default=0, metadata={"help": "seed of that synthetic data set"})
    max_len: int = field(
        default=128, metadata={"help": "series length: the LAST max_len steps, left-padded with zeros"}
    )
    sampling_rate_hz: float = field(
        default=10.0, metadata={"help": "the rows' rate (per-step differences -> rates)"}
    )
    n_folds: int = field(default=5, metadata={"help": "folds (unless the data folder has folds.csv)"})
    fold_seed: int = field(default=42, metadata={"help": "StratifiedGroupKFold's seed (unless folds.csv)"})


@dataclass
class PathSettings:
    data_dir: str = field(default=PathsConfig.data_dir, metadata={"help": "the competition files"})
    synthetic_dir: str = field(default=PathsConfig.synthetic_dir, metadata={"help": "the synthetic stand-in"})


@dataclass
class TrainSettings:
    """The training command line's settings (``key=value``)."""

    run_name: str = field(default="", metadata={"help": "the run folder's name (default: a timestamp)"})
    output_root: str = field(
        default="outputs", metadata={"help": "runs go to <output_root>/minirocket/<run_name>/"}
    )
    n_kernels: int = field(
        default=10_000, metadata={"help": "MiniRocket's features (a multiple of 84, at least 84)"}
    )
    seed: int = field(default=0, metadata={"help": "MiniRocket's random_state"})
    data: DataSettings = field(default_factory=DataSettings)
    paths: PathSettings = field(default_factory=PathSettings)


@dataclass
class LatencySettings:
    """The ``latency`` command line's settings (``key=value``)."""

    run_dir: str = field(default="", metadata={"help": "the run folder (required)"})
    data: str = field(
        default="synthetic", metadata={"help": "auto | competition | synthetic | a folder with test.csv"}
    )
    n_sequences: int | None = field(
        default=None, metadata={"help": "sequences timed (default: every test sequence)"}
    )
    warmup: int = field(default=10, metadata={"help": "predict() calls before timing"})
    seed: int = field(default=0, metadata={"help": "serving order"})
    num_threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    folds: list[int] | None = field(
        default=None, metadata={"help": "the folds to serve (default: every fold)"}
    )


def setting_rows(schema: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    """``(dotted key, default, help)`` of every setting of a settings dataclass."""
    rows = []
    for item in fields(schema):
        default = item.default_factory() if item.default_factory is not MISSING else item.default
        if is_dataclass(default):
            rows += setting_rows(type(default), f"{prefix}{item.name}.")
        else:
            rows.append((f"{prefix}{item.name}", default, item.metadata.get("help", "")))
    return rows


def _cli_value(value: Any) -> str:
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def settings_usage(schema: type, command: str, example: str) -> str:
    rows = [(key, _cli_value(default), text) for key, default, text in setting_rows(schema)]
    width = max(len(f"{key}={default}") for key, default, _ in rows)
    return "\n".join([
        f"usage: python -m codes.classical.minirocket {command}[key=value ...]",
        "",
        "settings (key=default):",
        *(f"  {f'{key}={default}':<{width}}  {text}" for key, default, text in rows),
        "",
        "example:",
        f"  {example}",
    ])  # fmt: skip


def _usage_error(message: str) -> NoReturn:
    usage_error(EXP_NAME, message)


def parse_settings(schema: type, args: Sequence[str], usage: str) -> DictConfig:
    """``key=value`` arguments over ``schema``'s defaults: ``codes.inference.experiment``'s
    :func:`~codes.inference.experiment.parse_key_values` with the dotted keys of
    :func:`setting_rows`."""
    return parse_key_values(args, schema, [key for key, _, _ in setting_rows(schema)], usage, EXP_NAME)


def check_train_settings(cfg: DictConfig) -> None:
    """Refuse settings that would fail later with an unclear error (a ``ValueError`` naming them)."""
    from omegaconf import OmegaConf

    for key, least in (("data.max_len", MIN_TIMEPOINTS), ("n_kernels", MIN_KERNELS), ("data.n_folds", 2)):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(
                f"{key}={value!r} must be a whole number >= {least}; set {key}=<n> with n >= {least}"
            )
    if not 0 <= cfg.seed < 2**32:
        raise ValueError(f"seed={cfg.seed} must lie in 0..2**32-1 (numpy's seeds)")


def run_config(cfg: DictConfig, run_name: str) -> dict[str, Any]:
    """``config.yaml`` of a run: its settings, the fixed feature settings and the model section."""
    return {
        "exp_name": EXP_NAME,
        "run_name": run_name,
        "data": {
            "source": cfg.data.source,
            "synthetic_subjects": int(cfg.data.synthetic_subjects),
            "synthetic_seed": int(cfg.data.synthetic_seed),
            "max_len": int(cfg.data.max_len),
            "sampling_rate_hz": float(cfg.data.sampling_rate_hz),
            "n_folds": int(cfg.data.n_folds),
            "fold_seed": int(cfg.data.fold_seed),
            "use_thm": False,
            "tof_mode": "none",
            "mirror_left_handed": True,
        },
        "paths": {
            "data_dir": str(cfg.paths.data_dir),
            "synthetic_dir": str(cfg.paths.synthetic_dir),
            "output_dir": str(cfg.output_root),
        },
        "model": {
            "kind": MODEL_KIND,
            "n_kernels": int(cfg.n_kernels),
            "seed": int(cfg.seed),
            "channels": list(CHANNELS),
            "alphas": [float(a) for a in ALPHAS],
            "max_dilations_per_kernel": MAX_DILATIONS_PER_KERNEL,
        },
    }


# ---------------------------------------------------------------- training
def new_run_dir(output_root: str | Path, run_name: str) -> Path:
    """``<output_root>/minirocket/<run_name>/`` (relative roots from the repository root), not
    created; an existing non-empty folder is refused (a ``FileExistsError`` saying what to do)."""
    from codes.common.runs import check_run_name, repo_path

    run_dir = repo_path(output_root) / EXP_NAME / check_run_name(run_name)
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise FileExistsError(
            f"{run_dir} already holds files (an earlier run); choose another run_name, or delete the folder "
            "to train this run again"
        )
    return run_dir


def train(cfg: DictConfig, overrides: Sequence[str] = ()) -> tuple[Path, dict]:
    """The whole run of the module docstring; returns (run folder, metrics)."""
    from omegaconf import OmegaConf

    from codes.common.data_source import resolve_data_dir
    from codes.common.folds import FOLD_FILE, check_selected_folds, data_folds
    from codes.common.metric import competition_score
    from codes.common.runs import (
        data_digests,
        git_commit,
        installed_packages,
        repo_path,
        setup_logging,
        write_run_record,
    )
    from codes.common.sequences import load_sequence_table, split_files
    from codes.common.training import write_outputs

    started = time.perf_counter()
    check_train_settings(cfg)
    run_name = cfg.run_name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = new_run_dir(cfg.output_root, run_name)  # refused before anything is read or written
    setup_logging(None)
    # the data and its folds first: a setting that fails there leaves no run folder behind
    data_dir = resolve_data_dir(
        cfg.data.source,
        competition_dir=repo_path(cfg.paths.data_dir),
        synthetic_dir=repo_path(cfg.paths.synthetic_dir),
        synthetic_subjects=cfg.data.synthetic_subjects,
        synthetic_seed=cfg.data.synthetic_seed,
    )
    settings = feature_settings(cfg.data.sampling_rate_hz)
    table = load_sequence_table(data_dir, "train", settings)
    folds, from_file = data_folds(
        data_dir, table.gestures, table.subjects, cfg.data.n_folds, cfg.data.fold_seed
    )
    source = (
        str(data_dir / FOLD_FILE)
        if from_file
        else f"data.n_folds={cfg.data.n_folds}, data.fold_seed={cfg.data.fold_seed}"
    )
    selected = check_selected_folds(folds, None, source)

    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir / "train.log")
    config = run_config(cfg, run_name)
    write_text_atomically(OmegaConf.to_yaml(OmegaConf.create(config)), run_dir / "config.yaml")
    write_text_atomically(
        "".join(f"{item}\n" for item in overrides) or "# defaults\n", run_dir / "overrides.txt"
    )
    write_text_atomically(git_commit() + "\n", run_dir / "git_commit.txt")
    write_text_atomically(installed_packages(), run_dir / "packages.txt")
    data_files = [path.name for path in split_files(data_dir, "train")] + [FOLD_FILE]
    write_run_record(run_dir, config, data_digests(data_dir, data_files))
    logger.info(
        "run folder %s: %d sequences of %s, folds %s from %s",
        run_dir, table.n_sequences, data_dir, selected, source,
    )  # fmt: skip
    series = sequence_series(table, cfg.data.max_len)
    labels = table.labels
    subjects = np.asarray(table.subjects).astype(str)
    names = np.array(GESTURES)

    results = {}
    for fold in selected:
        began = time.perf_counter()
        train_index, valid_index = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
        model, info = fit_fold(
            series[train_index], labels[train_index], cfg.n_kernels, cfg.seed, groups=subjects[train_index]
        )
        model.save(model_path(run_dir, fold))
        seconds = time.perf_counter() - began
        # the OOF probabilities as the predictor computes them (float32, like the neural members')
        probabilities = model.probabilities(series[valid_index]).astype(np.float32)
        true, predicted = names[labels[valid_index]], names[probabilities.argmax(1)]
        score = competition_score(true, predicted)
        history_row = {
            "epoch": 0,
            "train_loss": info["train_loss"],  # held-out (subject-grouped) log loss at the fitted temperature
            "valid_loss": log_loss_of(probabilities, labels[valid_index]),
            "valid_score": score,
            "valid_score_imu_only": score,
            "ridge_alpha": info["alpha"],
            "temperature": info["temperature"],
            "n_features": info["n_features"],
        }
        results[fold] = {
            "probabilities": probabilities,
            "imu_probabilities": probabilities,
            "history": [history_row],
            "best_epoch": 0,
            "train_seconds": seconds,
        }
        logger.info(
            "fold %d: score %.4f, accuracy %.4f, alpha %.3g, T %.4f (held-out log loss %.4f, %.4f at T=1), %.1f s",
            fold, score, float(np.mean(true == predicted)), info["alpha"], info["temperature"],
            info["train_loss"], info["train_loss_t1"], seconds,
        )  # fmt: skip
    metrics = write_outputs(run_dir, table, folds, results, time.perf_counter() - started)
    overall = metrics["overall"]
    logger.info(
        "CV score %.4f (binary F1 %.4f, macro F1 %.4f), IMU-only %.4f; %.0f s; outputs in %s",
        overall["score"], overall["binary_f1"], overall["macro_f1"], overall["score_imu_only"],
        overall["wall_seconds"], run_dir,
    )  # fmt: skip
    return run_dir, metrics


# ---------------------------------------------------------------- latency
def predict_latency(
    predictor: GestureAnswerer,
    data_dir: Path,
    n_sequences: int | None = None,
    warmup: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """``latency_summary`` (ms: n, p50, p90, p99, mean, max) of one ``predict()`` call per test.csv
    sequence of ``data_dir``, served by the local gateway in shuffled order after ``warmup`` calls."""
    import polars as pl

    from codes.inference.gateway import LocalGateway, latency_summary

    gateway = LocalGateway.from_dir(data_dir, seed=seed)
    if n_sequences:
        chosen = set(gateway.sequence_ids()[: int(n_sequences)])
        gateway = LocalGateway(
            gateway.test.filter(pl.col("sequence_id").is_in(chosen)), gateway.demographics, seed
        )
    for _, sequence, demographics in list(gateway.batches())[: max(0, int(warmup))]:
        predictor.predict(sequence, demographics)
    return latency_summary(gateway.serve(predictor.predict).seconds)


def latency_main(args: Sequence[str]) -> dict[str, float]:
    from codes.common.runs import REPO_ROOT, setup_logging
    from codes.inference.batch import resolve_test_dir

    usage = settings_usage(
        LatencySettings,
        "latency ",
        "python -m codes.classical.minirocket latency run_dir=outputs/minirocket/<run> data=synthetic",
    )
    cfg = parse_settings(LatencySettings, args, usage)
    setup_logging(None)
    if not cfg.run_dir:
        _usage_error("run_dir=outputs/minirocket/<run> is required")
    predictor = load_predictor(cfg.run_dir, cfg.folds, num_threads=cfg.num_threads, strict=True)
    data_dir = resolve_test_dir(cfg.data, load_run_config(Path(cfg.run_dir)), REPO_ROOT)
    logging.getLogger("codes.inference").setLevel(logging.ERROR)  # odd-row warnings: not timed noise
    latency = predict_latency(predictor, data_dir, cfg.n_sequences, cfg.warmup, cfg.seed)
    print(
        f"{cfg.run_dir} folds {predictor.folds}, max_len {predictor.max_len}, {torch.get_num_threads()} torch "
        f"thread(s), {int(latency['n'])} sequences of {data_dir / 'test.csv'}: predict() ms "
        + ", ".join(f"{k} {latency[k]:.1f}" for k in ("p50", "p90", "p99", "mean", "max"))
    )
    return latency


# ---------------------------------------------------------------- command line
def predict_main(args: Sequence[str]) -> dict | None:
    """Batch mode: ``codes.inference.experiment.batch_main`` with :func:`load_predictor`."""
    from codes.inference.experiment import batch_main, batch_usage

    if {"-h", "--help"} & set(args):
        print(
            batch_usage(EXP_NAME).replace(
                f"codes/exp/{EXP_NAME}/inference.py", "-m codes.classical.minirocket predict"
            )
        )
        raise SystemExit(0)
    return batch_main(load_predictor, EXP_NAME, list(args))


def main(argv: Sequence[str] | None = None) -> Any:
    """Training (``key=value ...``), ``predict`` (batch mode) or ``latency``; see the module docstring."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "predict":
        return predict_main(args[1:])
    if args and args[0] == "latency":
        return latency_main(args[1:])
    usage = settings_usage(
        TrainSettings,
        "",
        "python -m codes.classical.minirocket data.source=synthetic run_name=synthetic-s0\n\n"
        "other commands: predict run_dir=... data=... (batch mode; predict --help), latency run_dir=... "
        "(predict() latency; latency --help)",
    )
    cfg = parse_settings(TrainSettings, args, usage)
    return train(cfg, args)[1]


if __name__ == "__main__":
    main()

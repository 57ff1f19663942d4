"""A real wrist-IMU benchmark in the competition's file format (seglearn's Apple-watch recordings).

    python benchmarks/real_imu.py --data data/real_imu --exp exp019 --out outputs/real_imu.md
    python benchmarks/real_imu.py --exp exp018 --train-args "machine.num_threads=1"
    python benchmarks/real_imu.py --skip-train            # conversion + MiniRocket only

The competition's data cannot be downloaded here; ``seglearn.datasets.load_watch()`` ships real
recordings of a wrist-worn Apple watch (accelerometer in g, gyroscope in rad/s, 50 Hz) while
10 persons did 7 shoulder exercises with the left and the right arm. This script

1. converts persons 1-7 (``BENCHMARK_PERSONS``; persons 8-10 are reserved for acceptance
   testing and dropped right after loading) to the competition's files: train.csv,
   train_demographics.csv, test.csv, test_demographics.csv (IMU only: thermopile and ToF columns
   present but null), with acc in m/s^2, orientation quaternions from a complementary filter,
   200-step windows every 100 steps, one subject per person and arm, and ``folds.csv``: 5 folds
   grouped by person;
2. runs MiniRocket + ridge on those folds (acc and the quaternions' angular velocity);
3. runs an experiment's ``train.py`` (``variant=quick``) on the converted folder and tabulates its
   per-fold accuracy and competition score next to MiniRocket's.

Needs the ``bench`` extra (seglearn, aeon) for steps 1 and 2; the conversion functions work on
any arrays (tests/test_real_imu.py). See docs/real_imu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from codes.classical.minirocket import CHANNELS  # noqa: E402
from codes.common.features import FeatureSettings, gravity_in_body_frame  # noqa: E402
from codes.common.folds import FOLD_FILE, read_fold_file  # noqa: E402
from codes.common.metric import competition_score  # noqa: E402
from codes.common.schema import (  # noqa: E402
    ACC_COLUMNS,
    ACC_QUANTUM,
    BEHAVIOR_PERFORMS,
    DEMOGRAPHICS_COLUMNS,
    GRAVITY,
    PHASE_GESTURE,
    ROT_COLUMNS,
    ROT_QUANTUM,
    TEST_COLUMNS,
    THM_COLUMNS,
    TOF_COLUMNS,
    TRAIN_COLUMNS,
    sequence_type_of,
)
from codes.common.sequences import load_sequence_table  # noqa: E402
from codes.common.synthetic import quat_from_rotvec, quat_multiply  # noqa: E402

# Persons 8-10 of load_watch() are reserved for acceptance testing: no code path, plot,
# statistic, tuning or decision may use them. They are dropped right after loading, before
# anything is computed on them, and nothing about them is printed or counted.
BENCHMARK_PERSONS = range(1, 8)

SAMPLING_RATE_HZ = 50.0  # load_watch's rate
WATCH_CHANNELS = ["ax", "ay", "az", "wx", "wy", "wz"]  # load_watch's X_labels: acc in g, gyro in rad/s
WINDOW_STEPS = 200  # steps per sequence (4 s)
WINDOW_STRIDE = 100  # a new sequence every 100 steps; a recording's tail shorter than a window is dropped
N_FOLDS = 5

# Complementary filter: the gyroscope integrates the orientation; the measured acceleration pulls
# the estimated "up" direction towards it at FILTER_GAIN rad/s per rad of tilt error, fully when
# |acc| = g, not at all when |acc| differs from g by ACC_TOLERANCE_G g or more (linearly between).
FILTER_GAIN = 1.0  # 1/s: a tilt error decays with a time constant of about 1 s
ACC_TOLERANCE_G = 0.2
INITIAL_STEPS = 25  # the first orientation: the tilt of the mean acc direction over 0.5 s, yaw 0

# The 7 shoulder exercises as 4 Target and 3 Non-Target gestures of the competition (labels only:
# the movements are not the competition's gestures).
EXERCISE_TO_GESTURE: dict[str, str] = {
    "ABD": "Above ear - pull hair",  # abduction: arm raised sideways, hand above the head
    "FEL": "Forehead - scratch",  # forward elevation: arm raised forwards in front of the face
    "TRAP": "Neck - scratch",  # trapezius exercise
    "ER": "Cheek - pinch skin",  # external rotation
    "PEN": "Wave hello",  # pendulum: the hanging arm swings (Non-Target)
    "ROW": "Pull air toward your face",  # rowing: pulling towards the body (Non-Target)
    "IR": "Text on phone",  # internal rotation: the hand moves in front of the body (Non-Target)
}
ORIENTATION = "Seated Straight"  # a constant valid string (every gesture occurs seated straight)
ADULT = 1.0  # adult_child of every subject; age, sex, height and arm lengths are unknown (empty)


# ---------------------------------------------------------------- recordings
@dataclass
class Recordings:
    """Whole recordings: ``signals[i]`` is ``(T_i, 6)``: acc x, y, z in g, gyro x, y, z in rad/s."""

    signals: list[np.ndarray]
    persons: np.ndarray  # (R,) int, 1-based person number
    sides: np.ndarray  # (R,) 1 = right arm, 0 = left arm
    exercises: list[str]  # (R,) exercise names (keys of EXERCISE_TO_GESTURE)

    def subset(self, keep: np.ndarray) -> Recordings:
        index = np.flatnonzero(keep)
        return Recordings(
            signals=[self.signals[i] for i in index],
            persons=self.persons[index],
            sides=self.sides[index],
            exercises=[self.exercises[i] for i in index],
        )


def keep_benchmark_persons(recordings: Recordings) -> Recordings:
    """Only the recordings of ``BENCHMARK_PERSONS`` (the others are reserved; see above)."""
    return recordings.subset(np.isin(np.asarray(recordings.persons), list(BENCHMARK_PERSONS)))


def load_benchmark_recordings() -> Recordings:
    """seglearn's watch recordings of persons 1-7; persons 8-10 are dropped before any use."""
    from seglearn.datasets import load_watch

    data = load_watch()
    if list(data["X_labels"]) != WATCH_CHANNELS:
        raise ValueError(f"load_watch()'s channels are {data['X_labels']}, expected {WATCH_CHANNELS}")
    keep = np.isin(np.asarray(data["subject"]), list(BENCHMARK_PERSONS))
    index = np.flatnonzero(keep)
    names = list(data["y_labels"])
    recordings = Recordings(
        signals=[np.asarray(data["X"][i], dtype=np.float64) for i in index],
        persons=np.asarray(data["subject"])[index].astype(np.int64),
        sides=np.asarray(data["side"])[index].astype(np.int64),
        exercises=[names[int(data["y"][i])] for i in index],
    )
    del data  # nothing else of the reserved persons is kept
    return recordings


# ---------------------------------------------------------------- quaternions and the filter
def tilt_quaternion(up: np.ndarray) -> np.ndarray:
    """The shortest rotation taking body-frame vectors ``up`` ``(..., 3)`` onto world +z (yaw 0).

    ``R(q) up = |up| e_z``, i.e. ``gravity_in_body_frame(q) / g`` is ``up`` normalised.
    """
    up = up / np.linalg.norm(up, axis=-1, keepdims=True)
    ux, uy, uz = np.moveaxis(up, -1, 0)
    q = np.stack([1 + uz, uy, -ux, np.zeros_like(uz)], axis=-1)  # (1 + u.e_z, u x e_z)
    upside_down = (1 + uz) < 1e-9  # up = -e_z: half a turn about x
    q[upside_down] = (0.0, 1.0, 0.0, 0.0)
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def complementary_filter(
    acc: np.ndarray,
    gyro: np.ndarray,
    rate_hz: float = SAMPLING_RATE_HZ,
    gain: float = FILTER_GAIN,
    tolerance_g: float = ACC_TOLERANCE_G,
    initial: np.ndarray | None = None,
) -> np.ndarray:
    """Orientation quaternions (w, x, y, z) of one ``(T, 3)`` or a batch ``(B, T, 3)`` of recordings.

    ``acc`` in m/s^2 including gravity (the reading is ``R(q)^T (a_linear + g e_z)``, the
    competition's convention), ``gyro`` the body-frame angular velocity in rad/s. The quaternion
    rotates sensor-frame vectors into a world frame whose +z is "up" (the mean measured acc
    direction of the first ``INITIAL_STEPS`` steps, yaw 0) unless ``initial`` ``(4,)`` / ``(B, 4)``
    is given. Each step predicts with the gyroscope, ``p_t = q_{t-1} exp(w_t / rate)`` (``exp`` of
    a rotation vector; body-frame rates, so a constant rate turns by rate x time), then tilts the
    prediction towards the measured acc direction ``a_t``:
    ``q_t = p_t exp(gain * c_t * (a_t x v_t) / rate)``, with ``v_t = R(p_t)^T e_z`` the predicted
    up direction and ``c_t = clip(1 - ||acc_t| / g - 1| / tolerance_g, 0, 1)``. So
    ``rotvec(q_{t-1}^-1 q_t) * rate`` (the codes' angular velocity) is the gyroscope reading plus
    the small tilt correction (none when acc and gyro agree), and a still device has
    ``R(q)^T (0, 0, g)`` = its acc reading (linear acceleration 0).
    Steps whose acc is 0 (padding) get no correction. Quaternions are unit, w of either sign.
    """
    acc = np.asarray(acc, dtype=np.float64)
    gyro = np.asarray(gyro, dtype=np.float64)
    single = acc.ndim == 2
    if single:
        acc, gyro = acc[None], gyro[None]
    if acc.shape != gyro.shape or acc.shape[-1] != 3:
        raise ValueError(f"acc {acc.shape} and gyro {gyro.shape} must both be (T, 3) or (B, T, 3)")
    batch, steps, _ = acc.shape
    norm = np.linalg.norm(acc, axis=-1)
    direction = acc / np.where(norm > 0, norm, 1.0)[..., None]
    weight = gain * np.clip(1 - np.abs(norm / GRAVITY - 1) / tolerance_g, 0.0, 1.0)
    dt = 1.0 / rate_hz
    quaternions = np.empty((batch, steps, 4))
    if initial is None:
        first = direction[:, :INITIAL_STEPS].mean(axis=1)
        first[np.linalg.norm(first, axis=-1) < 1e-9] = (0.0, 0.0, 1.0)
        quaternions[:, 0] = tilt_quaternion(first)
    else:
        start = np.broadcast_to(np.asarray(initial, dtype=np.float64), (batch, 4))
        quaternions[:, 0] = start / np.linalg.norm(start, axis=-1, keepdims=True)
    for t in range(1, steps):
        predicted = quat_multiply(quaternions[:, t - 1], quat_from_rotvec(gyro[:, t] * dt))
        predicted_up = gravity_in_body_frame(predicted) / GRAVITY
        correction = weight[:, t, None] * np.cross(direction[:, t], predicted_up)
        current = quat_multiply(predicted, quat_from_rotvec(correction * dt))
        quaternions[:, t] = current / np.linalg.norm(current, axis=-1, keepdims=True)
    return quaternions[0] if single else quaternions


def filter_recordings(signals: Sequence[np.ndarray], rate_hz: float = SAMPLING_RATE_HZ) -> list[np.ndarray]:
    """:func:`complementary_filter` of every ``(T_i, 6)`` recording (acc in g, gyro in rad/s)."""
    if not signals:
        return []
    longest = max(len(s) for s in signals)
    acc = np.zeros((len(signals), longest, 3))
    gyro = np.zeros((len(signals), longest, 3))
    for i, signal in enumerate(signals):
        acc[i, : len(signal)] = signal[:, :3] * GRAVITY
        gyro[i, : len(signal)] = signal[:, 3:6]
    quaternions = complementary_filter(acc, gyro, rate_hz)
    return [quaternions[i, : len(s)] for i, s in enumerate(signals)]


# ---------------------------------------------------------------- windows and files
def window_starts(n_steps: int, window: int = WINDOW_STEPS, stride: int = WINDOW_STRIDE) -> np.ndarray:
    """First step of every full window of a recording of ``n_steps`` steps."""
    if n_steps < window:
        return np.zeros(0, dtype=np.int64)
    return np.arange(0, n_steps - window + 1, stride, dtype=np.int64)


def subject_name(person: int, side: int) -> str:
    """``W01L`` / ``W01R``: one subject per person and arm."""
    return f"W{int(person):02d}{'R' if int(side) == 1 else 'L'}"


def person_of_subject(subject: str) -> int:
    return int(subject[1:3])


def person_folds(persons: Sequence[int], n_folds: int = N_FOLDS) -> dict[int, int]:
    """Fold of every person: the k-th smallest person number goes to fold ``k % n_folds``."""
    unique = sorted({int(p) for p in persons})
    if len(unique) < n_folds:
        raise ValueError(f"{n_folds} folds need at least {n_folds} persons, got {len(unique)}")
    return {person: rank % n_folds for rank, person in enumerate(unique)}


@dataclass
class ConvertedData:
    """The competition-format tables of the benchmark (see :func:`convert_recordings`)."""

    train: pl.DataFrame
    train_demographics: pl.DataFrame
    test: pl.DataFrame
    test_demographics: pl.DataFrame
    folds: pl.DataFrame  # subject, fold
    info: dict = field(default_factory=dict)


def _sensor_frame(acc: np.ndarray, quaternions: np.ndarray) -> pl.DataFrame:
    """acc (m/s^2) and rot columns, quantised as the competition's (1/256 and 1/16384), w >= 0."""
    quaternions = np.where(quaternions[:, :1] < 0, -quaternions, quaternions)
    acc = np.round(acc / ACC_QUANTUM) * ACC_QUANTUM
    quaternions = np.round(quaternions / ROT_QUANTUM) * ROT_QUANTUM
    columns = {c: acc[:, k] for k, c in enumerate(ACC_COLUMNS)}
    columns.update({c: quaternions[:, k] for k, c in enumerate(ROT_COLUMNS)})
    return pl.DataFrame(columns)


def convert_recordings(
    recordings: Recordings,
    window: int = WINDOW_STEPS,
    stride: int = WINDOW_STRIDE,
    rate_hz: float = SAMPLING_RATE_HZ,
    n_folds: int = N_FOLDS,
) -> ConvertedData:
    """The benchmark's competition-format tables from whole recordings (persons 1-7 only).

    Recordings of other persons are dropped first. The filter runs over each whole recording,
    which is then cut into ``window``-step sequences every ``stride`` steps (ordered by person,
    arm, exercise, start). Every row is ``Performs gesture`` / ``Gesture`` of the exercise's
    gesture (``EXERCISE_TO_GESTURE``), orientation ``ORIENTATION``. test.csv holds the first
    sequence of every subject again (copies of training sequences, without labels), only so the
    folder has all four files.
    """
    recordings = keep_benchmark_persons(recordings)
    if not recordings.signals:
        raise ValueError(f"no recording of the benchmark persons {list(BENCHMARK_PERSONS)}")
    unknown = sorted(set(recordings.exercises) - set(EXERCISE_TO_GESTURE))
    if unknown:
        raise ValueError(f"exercises without a gesture: {unknown}")
    order = sorted(
        range(len(recordings.signals)),
        key=lambda i: (
            int(recordings.persons[i]),
            int(recordings.sides[i]),
            list(EXERCISE_TO_GESTURE).index(recordings.exercises[i]),
            i,
        ),
    )
    quaternions = filter_recordings([recordings.signals[i] for i in order], rate_hz)
    parts, meta = [], []
    for i, rotation in zip(order, quaternions, strict=True):
        signal = recordings.signals[i]
        subject = subject_name(recordings.persons[i], recordings.sides[i])
        gesture = EXERCISE_TO_GESTURE[recordings.exercises[i]]
        for start in window_starts(len(signal), window, stride):
            steps = slice(int(start), int(start) + window)
            parts.append(_sensor_frame(signal[steps, :3] * GRAVITY, rotation[steps]))
            meta.append((subject, gesture))
    if not parts:
        raise ValueError(f"no recording is {window} steps long")
    sequence_ids = [f"SEQ_{k:06d}" for k in range(len(parts))]
    sensors = pl.concat(parts)
    subjects = [s for s, _ in meta]
    gestures = [g for _, g in meta]
    train = _with_ids(sensors, sequence_ids, window).with_columns(
        pl.Series("subject", np.repeat(subjects, window)),
        pl.Series("gesture", np.repeat(gestures, window)),
        pl.Series("sequence_type", np.repeat([sequence_type_of(g) for g in gestures], window)),
        pl.lit(ORIENTATION).alias("orientation"),
        pl.lit(BEHAVIOR_PERFORMS).alias("behavior"),
        pl.lit(PHASE_GESTURE).alias("phase"),
    )
    train = _with_empty_thm_tof(train).select(TRAIN_COLUMNS)

    unique_subjects = sorted(set(subjects))
    first_sequence = [subjects.index(s) for s in unique_subjects]
    test_ids = [f"SEQ_{len(parts) + k:06d}" for k in range(len(first_sequence))]
    test = _with_ids(pl.concat([parts[k] for k in first_sequence]), test_ids, window).with_columns(
        pl.Series("subject", np.repeat(unique_subjects, window))
    )
    test = _with_empty_thm_tof(test).select(TEST_COLUMNS)

    demographics = demographics_frame(unique_subjects)
    fold_of_person = person_folds([person_of_subject(s) for s in unique_subjects], n_folds)
    folds = pl.DataFrame(
        {
            "subject": unique_subjects,
            "fold": [fold_of_person[person_of_subject(s)] for s in unique_subjects],
        }
    )
    info = {
        "source": "seglearn.datasets.load_watch(): Apple watch, accelerometer (g) and gyroscope (rad/s)",
        "persons": sorted(fold_of_person),
        "sampling_rate_hz": rate_hz,
        "window_steps": window,
        "window_stride": stride,
        "filter": {"gain": FILTER_GAIN, "acc_tolerance_g": ACC_TOLERANCE_G, "initial_steps": INITIAL_STEPS},
        "exercise_to_gesture": EXERCISE_TO_GESTURE,
        "n_train_sequences": len(parts),
        "n_subjects": len(unique_subjects),
        "n_test_sequences": len(test_ids),
        "test_note": "test.csv repeats the first training sequence of every subject (no held-out data)",
    }
    return ConvertedData(train, demographics, test, demographics, folds, info)


def _with_ids(sensors: pl.DataFrame, sequence_ids: list[str], window: int) -> pl.DataFrame:
    counter = np.tile(np.arange(window, dtype=np.int64), len(sequence_ids))
    frame = sensors.with_columns(
        pl.Series("sequence_id", np.repeat(sequence_ids, window)),
        pl.Series("sequence_counter", counter),
    )
    return frame.with_columns(
        (pl.col("sequence_id") + "_" + pl.col("sequence_counter").cast(pl.String).str.zfill(6)).alias(
            "row_id"
        )
    )


def _with_empty_thm_tof(frame: pl.DataFrame) -> pl.DataFrame:
    """An IMU-only device: thermopile and ToF columns present, null throughout."""
    return frame.with_columns([pl.lit(None, dtype=pl.Float32).alias(c) for c in THM_COLUMNS + TOF_COLUMNS])


def demographics_frame(subjects: Sequence[str]) -> pl.DataFrame:
    """One row per subject: handedness from the arm (right = 1), adult, the rest unknown (empty)."""
    rows = {c: [] for c in DEMOGRAPHICS_COLUMNS}
    for subject in subjects:
        for column in DEMOGRAPHICS_COLUMNS:
            rows[column].append(None)
        rows["subject"][-1] = subject
        rows["adult_child"][-1] = ADULT
        rows["handedness"][-1] = 1.0 if subject.endswith("R") else 0.0
    schema = {c: (pl.String if c == "subject" else pl.Float64) for c in DEMOGRAPHICS_COLUMNS}
    return pl.DataFrame(rows, schema=schema)


def write_converted(data: ConvertedData, out_dir: Path) -> None:
    """train.csv, train_demographics.csv, test.csv, test_demographics.csv, folds.csv, conversion.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data.train.write_csv(out_dir / "train.csv")
    data.train_demographics.write_csv(out_dir / "train_demographics.csv")
    data.test.write_csv(out_dir / "test.csv")
    data.test_demographics.write_csv(out_dir / "test_demographics.csv")
    data.folds.write_csv(out_dir / FOLD_FILE)
    (out_dir / "conversion.json").write_text(json.dumps(data.info, indent=1) + "\n")


# ---------------------------------------------------------------- MiniRocket
MINIROCKET_FEATURES = CHANNELS  # the classical member's channels (codes/classical/minirocket.py)


def benchmark_feature_settings(rate_hz: float = SAMPLING_RATE_HZ) -> FeatureSettings:
    """The codes' IMU features of the converted files (left arms mirrored, as training does)."""
    return FeatureSettings(use_thm=False, tof_mode="none", mirror_left_handed=True, sampling_rate_hz=rate_hz)


def sequence_arrays(data_dir: Path, rate_hz: float = SAMPLING_RATE_HZ):
    """(series ``(N, 6, L)``, gestures, subjects, sequence ids) of the converted train.csv."""
    table = load_sequence_table(data_dir, "train", benchmark_feature_settings(rate_hz))
    lengths = table.lengths
    if len(set(lengths.tolist())) != 1:
        raise ValueError(f"sequences of {data_dir} differ in length: {sorted(set(lengths.tolist()))}")
    columns = [table.feature_names.index(name) for name in MINIROCKET_FEATURES]
    series = table.features[:, columns].reshape(table.n_sequences, int(lengths[0]), len(columns))
    return (
        np.ascontiguousarray(series.transpose(0, 2, 1), dtype=np.float32),
        np.asarray(table.gestures).astype(object),
        np.asarray(table.subjects).astype(str),
        np.asarray(table.sequence_ids).astype(str),
    )


def minirocket_predictions(
    series: np.ndarray, gestures: np.ndarray, folds: np.ndarray, seed: int = 0, n_kernels: int = 10_000
) -> np.ndarray:
    """Out-of-fold gestures of aeon's MiniRocket + StandardScaler + RidgeClassifierCV."""
    from aeon.transformations.collection.convolution_based import MiniRocket
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    predictions = np.empty(len(gestures), dtype=object)
    for fold in np.unique(folds):
        train = folds != fold
        transform = MiniRocket(n_kernels=n_kernels, n_jobs=1, random_state=seed)
        train_features = transform.fit_transform(series[train])
        model = make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=np.logspace(-3, 3, 10)))
        model.fit(train_features, gestures[train])
        predictions[~train] = model.predict(transform.transform(series[~train]))
    return predictions


# ---------------------------------------------------------------- scores and the table
@dataclass
class ModelResult:
    name: str
    folds: np.ndarray  # fold of every sequence the model predicted
    gestures: np.ndarray
    predictions: np.ndarray
    seconds: float
    note: str = ""
    sequence_ids: np.ndarray | None = None


def fold_scores(result: ModelResult) -> dict[str, dict]:
    """Accuracy and competition score per fold and out of fold."""
    per_fold = {}
    for fold in np.unique(result.folds):
        mask = result.folds == fold
        per_fold[int(fold)] = {
            "accuracy": float(np.mean(result.gestures[mask] == result.predictions[mask])),
            "score": float(competition_score(result.gestures[mask], result.predictions[mask])),
        }
    overall = {
        "accuracy": float(np.mean(result.gestures == result.predictions)),
        "score": float(competition_score(result.gestures, result.predictions)),
    }
    return {"folds": per_fold, "overall": overall}


def markdown_table(results: Sequence[ModelResult], header_lines: Sequence[str] = ()) -> str:
    """Per-fold accuracy and score of every model, their fold means and the out-of-fold values."""
    n_folds = max(len(np.unique(r.folds)) for r in results)
    lines = list(header_lines)
    lines += [
        "| model | metric | "
        + " | ".join(f"fold {k}" for k in range(n_folds))
        + " | fold mean | OOF | time |",
        "| --- | --- | " + " | ".join("---:" for _ in range(n_folds)) + " | ---: | ---: | ---: |",
    ]
    for result in results:
        scores = fold_scores(result)
        for metric in ("accuracy", "score"):
            values = [scores["folds"].get(k, {}).get(metric) for k in range(n_folds)]
            cells = [f"{v:.4f}" if v is not None else "-" for v in values]
            mean = np.mean([v for v in values if v is not None])
            time_cell = f"{result.seconds:.0f} s" if metric == "accuracy" else ""
            lines.append(
                f"| {result.name} | {metric} | " + " | ".join(cells)
                + f" | {mean:.4f} | {scores['overall'][metric]:.4f} | {time_cell} |"
            )  # fmt: skip
    notes = [f"- {r.name}: {r.note}" for r in results if r.note]
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


# ---------------------------------------------------------------- training an experiment
def train_command(exp: str, data_dir: Path, run_name: str, extra: Sequence[str] = ()) -> list[str]:
    """The ``train.py`` command line of the benchmark (extra overrides last, so they win)."""
    return [
        sys.executable,
        str(Path("codes") / "exp" / exp / "train.py"),
        "variant=quick",
        "machine=cpu",
        "data.source=competition",
        f"paths.data_dir={data_dir}",
        f"data.max_len={WINDOW_STEPS}",
        f"data.sampling_rate_hz={SAMPLING_RATE_HZ:g}",
        f"run_name={run_name}",
        *extra,
    ]


def run_dir_of(exp: str, run_name: str, extra: Sequence[str] = ()) -> Path:
    """``<paths.output_dir>/<exp>/<run_name>`` (``outputs`` unless the overrides change it)."""
    output_dir = "outputs"
    for override in extra:
        if override.startswith("paths.output_dir="):
            output_dir = override.split("=", 1)[1]
    output = Path(output_dir)
    return (output if output.is_absolute() else REPO_ROOT / output) / exp / run_name


def experiment_result(run_dir: Path, name: str) -> ModelResult:
    """A :class:`ModelResult` from a run's oof.parquet (its time: metrics.json's wall_seconds)."""
    oof = pl.read_parquet(
        run_dir / "oof.parquet", columns=["sequence_id", "fold", "gesture", "predicted_gesture"]
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return ModelResult(
        name=name,
        folds=oof["fold"].to_numpy(),
        gestures=oof["gesture"].to_numpy().astype(object),
        predictions=oof["predicted_gesture"].to_numpy().astype(object),
        seconds=float(metrics["overall"]["wall_seconds"]),
        sequence_ids=oof["sequence_id"].to_numpy().astype(str),
    )


def folds_by_sequence(result: ModelResult, sequence_ids: np.ndarray) -> np.ndarray:
    """The fold ``result`` gave every sequence of ``sequence_ids`` (-1: not predicted)."""
    fold_of = dict(zip(result.sequence_ids.tolist(), result.folds.tolist(), strict=True))
    return np.array([fold_of.get(s, -1) for s in sequence_ids.tolist()], dtype=np.int64)


# ---------------------------------------------------------------- command line
def _relative_to_repo(path: Path) -> Path:
    path = Path(path).resolve()
    try:
        return path.relative_to(REPO_ROOT)
    except ValueError:
        return path


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("data/real_imu"), help="the converted folder")
    parser.add_argument("--exp", default="exp019", help="the experiment whose train.py runs")
    parser.add_argument("--run-name", default=None, help="train.py's run_name (default real_imu-<time>)")
    parser.add_argument(
        "--train-args", default="", help='extra train.py overrides, e.g. "machine.num_threads=1"'
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/real_imu.md"), help="the markdown table")
    parser.add_argument("--seed", type=int, default=0, help="MiniRocket's random_state")
    parser.add_argument("--reuse", action="store_true", help="keep converted files already in --data")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-minirocket", action="store_true")
    parser.add_argument(
        "--from-run", type=Path, default=None, help="tabulate this finished run folder instead of training"
    )
    args = parser.parse_args(argv)
    os.chdir(REPO_ROOT)
    data_dir = _relative_to_repo(args.data)
    started = time.perf_counter()

    if not (args.reuse and (data_dir / "train.csv").is_file()):
        converted = convert_recordings(load_benchmark_recordings())
        write_converted(converted, data_dir)
        info = converted.info
        print(
            f"converted persons {info['persons']} into {data_dir}: {info['n_train_sequences']} sequences of "
            f"{info['window_steps']} steps, {info['n_subjects']} subjects ({time.perf_counter() - started:.1f} s)",
            flush=True,
        )
    series, gestures, subjects, sequence_ids = sequence_arrays(data_dir)
    folds = read_fold_file(data_dir / FOLD_FILE, subjects)
    if folds is None:
        raise FileNotFoundError(f"{data_dir / FOLD_FILE} is missing; convert again without --reuse")
    fold_of_subject = dict(zip(subjects.tolist(), folds.tolist(), strict=True))
    persons_of_fold = {
        k: sorted({person_of_subject(s) for s, f in fold_of_subject.items() if f == k})
        for k in sorted(set(folds))
    }
    header = [
        f"Real wrist IMU (seglearn watch data, persons {sorted({person_of_subject(s) for s in subjects})}): "
        f"{len(gestures)} sequences of {series.shape[-1]} steps at {SAMPLING_RATE_HZ:g} Hz, "
        f"{len(set(subjects))} subjects (person x arm), folds by person "
        + ", ".join(f"{k}: {v}" for k, v in persons_of_fold.items())
        + f"; {datetime.now(timezone.utc):%Y-%m-%d}.",
        "",
    ]
    results = []
    if not args.skip_minirocket:
        began = time.perf_counter()
        predictions = minirocket_predictions(series, gestures, folds, seed=args.seed)
        results.append(
            ModelResult("MiniRocket + ridge", folds, gestures, predictions, time.perf_counter() - began,
                        note="acc (m/s^2) + angular velocity from the quaternions, 10,000 kernels, StandardScaler, "
                        "RidgeClassifierCV; its time: 5 MiniRocket fits + ridge fits (numba compiles on first use)")
        )  # fmt: skip
        print(markdown_table(results[-1:]), flush=True)
    if args.from_run is not None or not args.skip_train:
        extra = shlex.split(args.train_args)
        if args.from_run is not None:
            run_dir, name = args.from_run, f"{args.from_run.parent.name} ({args.from_run.name})"
        else:
            run_name = args.run_name or f"real_imu-{datetime.now():%Y%m%d-%H%M%S}"
            command = train_command(args.exp, data_dir, run_name, extra)
            print("running:", shlex.join(command), flush=True)
            began = time.perf_counter()
            subprocess.run(command, check=True, cwd=REPO_ROOT)
            print(f"train.py took {time.perf_counter() - began:.0f} s", flush=True)
            run_dir, name = run_dir_of(args.exp, run_name, extra), f"{args.exp} quick"
        result = experiment_result(run_dir, name)
        run_folds = folds_by_sequence(result, sequence_ids)
        predicted = run_folds >= 0
        if np.array_equal(run_folds[predicted], folds[predicted]):
            result.note = "its folds are folds.csv's (person-grouped)"
            results.append(result)
        else:
            result.note = (
                "its folds are NOT folds.csv's: train.py grouped by subject (person x arm), so the two arms "
                "of one person can fall in different folds; compare it with MiniRocket on the same folds"
            )
            results.append(result)
            if not args.skip_minirocket and predicted.all():
                began = time.perf_counter()
                predictions = minirocket_predictions(series, gestures, run_folds, seed=args.seed)
                results.append(
                    ModelResult("MiniRocket + ridge, train.py's folds", run_folds, gestures, predictions,
                                time.perf_counter() - began)
                )  # fmt: skip
    if not results:
        return
    table = markdown_table(results, header)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(f"written to {args.out} ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()

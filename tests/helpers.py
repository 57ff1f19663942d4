"""Small hand-made competition frames for unit tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from codes.common.schema import (
    BEHAVIOR_PERFORMS,
    DEMOGRAPHICS_COLUMNS,
    GESTURES,
    PHASE_GESTURE,
    SENSOR_COLUMNS,
    TEST_COLUMNS,
    TRAIN_COLUMNS,
    sequence_type_of,
)


def rest_sensors(
    quaternion: np.ndarray, acc: np.ndarray, n_steps: int, rng: np.random.Generator
) -> np.ndarray:
    """(n_steps, 332) rows: the given IMU reading repeated, random thermopiles and ToF."""
    rows = np.empty((n_steps, len(SENSOR_COLUMNS)), dtype=np.float64)
    rows[:, 0:3] = acc
    rows[:, 3:7] = quaternion
    rows[:, 7:12] = rng.uniform(24, 34, size=(n_steps, 5))
    rows[:, 12:] = rng.integers(-1, 255, size=(n_steps, 320))
    return rows


def make_frame(
    sequences: list[tuple[str, str, np.ndarray]],
    gestures: list[str] | None = None,
    orientation: str = "Seated Straight",
) -> pl.DataFrame:
    """A train-format frame (test-format when ``gestures`` is None) from (sequence_id, subject, sensors)."""
    parts = []
    for i, (sequence_id, subject, sensors) in enumerate(sequences):
        n = len(sensors)
        columns: dict[str, object] = {
            "row_id": [f"{sequence_id}_{t:06d}" for t in range(n)],
            "sequence_id": [sequence_id] * n,
            "sequence_counter": np.arange(n, dtype=np.int64),
            "subject": [subject] * n,
        }
        if gestures is not None:
            columns.update(
                sequence_type=[sequence_type_of(gestures[i])] * n,
                orientation=[orientation] * n,
                behavior=[BEHAVIOR_PERFORMS] * n,
                phase=[PHASE_GESTURE] * n,
                gesture=[gestures[i]] * n,
            )
        for j, name in enumerate(SENSOR_COLUMNS):
            columns[name] = sensors[:, j]
        parts.append(pl.DataFrame(columns).fill_nan(None))
    frame = pl.concat(parts)
    return frame.select(TRAIN_COLUMNS if gestures is not None else TEST_COLUMNS)


def make_demographics(subjects: list[str], left_handed: set[str] = frozenset()) -> pl.DataFrame:
    rows = [
        {
            "subject": s,
            "adult_child": 1,
            "age": 30,
            "sex": 1,
            "handedness": 0 if s in left_handed else 1,
            "height_cm": 170.0,
            "shoulder_to_wrist_cm": 55,
            "elbow_to_wrist_cm": 30,
        }
        for s in subjects
    ]
    return pl.DataFrame(rows).select(DEMOGRAPHICS_COLUMNS)


def write_dataset(
    directory: Path, frame: pl.DataFrame, demographics: pl.DataFrame, split: str = "train"
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    frame.write_csv(directory / f"{split}.csv")
    demographics.write_csv(directory / f"{split}_demographics.csv")
    return directory


def write_toy_data(directory: Path) -> Path:
    """6 subjects x 18 gestures in the competition format; each gesture a different noise level."""
    rng = np.random.default_rng(0)
    subjects = [f"SUBJ_{i:06d}" for i in range(6)]
    sequences, gestures = [], []
    for s, subject in enumerate(subjects):
        for g, gesture in enumerate(GESTURES):
            n = int(rng.integers(29, 90))
            sensors = rest_sensors(np.array([1.0, 0, 0, 0]), np.array([0, 0, 9.8]), n, rng)
            sensors[:, :3] += rng.normal(size=(n, 3)) * (0.2 + g / 4)
            sequences.append((f"SEQ_{s * 100 + g:06d}", subject, sensors))
            gestures.append(gesture)
    return write_dataset(
        directory, make_frame(sequences, gestures), make_demographics(subjects, {subjects[1]})
    )


def experiment_config(exp: str, *overrides: str):
    """Experiment ``exp``'s config composed as its ``train.py`` composes it, with ``overrides``."""
    import importlib

    from hydra import compose, initialize_config_dir

    # each experiment stores its own schema under the same name: the last one stored is used
    importlib.import_module(f"codes.exp.{exp}.config").register_configs()
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        return compose(config_name="experiment", overrides=list(overrides))


def training_config(exp: str, data_dir: Path, output_dir: Path, model: dict, *overrides: str):
    """Experiment ``exp``'s composed config: quick preset, the given data folder, 2 folds, a tiny model."""
    import importlib

    from hydra import compose, initialize_config_dir

    # each experiment stores its own schema under the same name: the last one stored is used
    importlib.import_module(f"codes.exp.{exp}.config").register_configs()
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        return compose(
            config_name="experiment",
            overrides=[
                "variant=quick",
                "machine=cpu",
                "data=competition",
                f"paths.data_dir={data_dir}",
                f"paths.output_dir={output_dir}",
                "data.n_folds=2",
                "data.max_len=64",
                "trainer.batch_size=32",
                *[f"model.{k}={v}" for k, v in model.items()],
                *overrides,
            ],
        )


def labelled_test_dir(data_dir: Path, tmp_path: Path) -> Path:
    """``data_dir``'s training data as a labelled test set in ``tmp_path/test``: test.csv (the
    label columns dropped), test_demographics.csv and test_labels.csv (sequence_id, gesture)."""
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    train = pl.read_csv(data_dir / "train.csv")
    train.drop("sequence_type", "orientation", "behavior", "phase", "gesture").write_csv(
        test_dir / "test.csv"
    )
    pl.read_csv(data_dir / "train_demographics.csv").write_csv(test_dir / "test_demographics.csv")
    train.select("sequence_id", "gesture").unique("sequence_id").write_csv(test_dir / "test_labels.csv")
    return test_dir


def train_smoke_run(exp: str, data_dir: Path, output_dir: Path, *overrides: str) -> Path:
    """Experiment ``exp``'s smoke variant trained on ``data_dir`` (CPU) as ``output_dir/<exp>/tiny``."""
    import importlib

    cfg = experiment_config(
        exp, "variant=smoke", "machine=cpu", "data=competition", f"paths.data_dir={data_dir}",
        f"paths.output_dir={output_dir}", "run_name=tiny", *overrides,
    )  # fmt: skip
    importlib.import_module(f"codes.exp.{exp}.train").run_training(cfg)
    return output_dir / exp / "tiny"

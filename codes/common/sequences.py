"""Model-ready sequence arrays: the ragged feature table, padding, normalisation and the cache.

A :class:`SequenceTable` holds every sequence of a file as one ragged array (rows of all
sequences stacked, plus offsets), so it is cheap to cache, subset by fold and pad. Runs that
augment raw signals also keep the raw sensor rows (``keep_sensors``) and compute features per
batch from them (``codes/common/augment.py``); the cache holds features only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.preprocessing import StandardScaler

from codes.common.atomic_files import atomic_path
from codes.common.data_files import (
    TEST_DEMOGRAPHICS_FILE,
    TEST_FILE,
    TRAIN_DEMOGRAPHICS_FILE,
    TRAIN_FILE,
    DataFileError,
    check_columns,
    check_demographics_cover,
    read_demographics,
    read_test,
    read_train,
    require_file,
)
from codes.common.demographics import out_of_range_as_unknown
from codes.common.features import (
    FEATURE_VERSION,
    GRID_SCALE,
    FeatureSettings,
    compute_step_features,
    feature_layout,
)
from codes.common.schema import DEMOGRAPHIC_FIELDS, GESTURE_TO_INDEX, GESTURES

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
# the non-sensor columns a SequenceTable is built from (the other labels are not read)
TABLE_META_COLUMNS = ("sequence_id", "sequence_counter", "subject", "gesture", "orientation")
# the columns a SequenceTable takes from one row per sequence
ONE_VALUE_PER_SEQUENCE = ("subject", "gesture", "orientation")


@dataclass
class SequenceTable:
    """Every sequence of a file: ragged per-step features and per-sequence metadata."""

    sequence_ids: np.ndarray  # (N,) str
    subjects: np.ndarray  # (N,) str
    offsets: np.ndarray  # (N + 1,) int64: rows of sequence i are offsets[i]:offsets[i + 1]
    features: np.ndarray  # (R, F) float32
    step_valid: np.ndarray  # (R,) bool: acc and rot were read at this step (not filled in)
    feature_present: np.ndarray  # (N, F) bool: the sequence had readings behind the feature
    demographics: np.ndarray  # (N, 7) float32, DEMOGRAPHIC_FIELDS, NaN = missing
    labels: np.ndarray  # (N,) int64 index into GESTURES, -1 = unknown (test)
    orientations: np.ndarray  # (N,) str, "" = unknown (test)
    feature_names: list[str]
    feature_groups: dict[str, list[int]]  # "imu" / "thm" / "tof" -> feature indices
    # (R, C) float32 raw values of the settings' sensor_columns, rows aligned with ``features``
    # (NaN = missing, ToF -1 kept): only with ``load_sequence_table(keep_sensors=True)``; never cached
    sensors: np.ndarray | None = None

    @property
    def left_handed(self) -> np.ndarray:
        """(N,) bool: the wearer is left-handed (unknown handedness counts as right-handed)."""
        return self.demographics[:, DEMOGRAPHIC_FIELDS.index("handedness")] == 0

    @property
    def n_sequences(self) -> int:
        return len(self.sequence_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def imu_only(self) -> np.ndarray:
        """(N,) bool: the sequence has no thermopile or ToF reading at all."""
        other = self.feature_groups.get("thm", []) + self.feature_groups.get("tof", [])
        if not other:
            return np.ones(self.n_sequences, dtype=bool)
        return ~self.feature_present[:, other].any(axis=1)

    @property
    def gestures(self) -> np.ndarray:
        """(N,) gesture strings ("" where unknown)."""
        names = np.array([*GESTURES, ""], dtype=object)
        return names[self.labels]

    def sequence_features(self, i: int) -> np.ndarray:
        return self.features[self.offsets[i] : self.offsets[i + 1]]

    def subset(self, indices: np.ndarray) -> SequenceTable:
        """The sequences at ``indices`` (in that order), rows copied."""
        indices = np.asarray(indices, dtype=np.int64)
        starts, ends = self.offsets[indices], self.offsets[indices + 1]
        lengths = ends - starts
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        rows = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return replace(
            self,
            sequence_ids=self.sequence_ids[indices],
            subjects=self.subjects[indices],
            offsets=offsets,
            features=self.features[rows],
            step_valid=self.step_valid[rows],
            feature_present=self.feature_present[indices],
            demographics=self.demographics[indices],
            labels=self.labels[indices],
            orientations=self.orientations[indices],
            sensors=self.sensors[rows] if self.sensors is not None else None,
        )

    # ------------------------------------------------------------ persistence
    def save(self, path: Path) -> None:
        """Write an ``.npz`` atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        arrays = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("feature_names", "feature_groups", "sensors")
        }
        arrays["sequence_ids"] = arrays["sequence_ids"].astype(str)
        arrays["subjects"] = arrays["subjects"].astype(str)
        arrays["orientations"] = arrays["orientations"].astype(str)
        arrays["layout_json"] = np.array(
            json.dumps({"names": self.feature_names, "groups": self.feature_groups})
        )
        grid = _grid_slice(self.feature_groups)
        if grid is not None:
            codes = grid_codes(self.features, grid)
            if codes is not None:  # 1 byte per pixel instead of 4, restored exactly by load
                arrays["grid_codes"] = codes
                arrays["features"] = np.concatenate(
                    [self.features[:, : grid.start], self.features[:, grid.stop :]], axis=1
                )
        with atomic_path(path) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, **arrays)

    @classmethod
    def load(cls, path: Path) -> SequenceTable:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
        layout = json.loads(str(arrays.pop("layout_json")))
        codes = arrays.pop("grid_codes", None)
        if codes is not None:
            grid, rest = _grid_slice(layout["groups"]), arrays["features"]
            features = np.empty((len(rest), rest.shape[1] + codes.shape[1]), dtype=np.float32)
            features[:, : grid.start] = rest[:, : grid.start]
            features[:, grid.stop :] = rest[:, grid.start :]
            for start in range(0, len(codes), GRID_CHUNK_ROWS):  # chunks: no full-size temporary
                end = start + GRID_CHUNK_ROWS
                np.divide(
                    codes[start:end], np.float32(GRID_SCALE), out=features[start:end, grid], dtype=np.float32
                )
            arrays["features"] = features
        return cls(**arrays, feature_names=layout["names"], feature_groups=layout["groups"])


GRID_CHUNK_ROWS = 16_384  # rows of the ToF grid converted at a time (small temporaries)


def _grid_slice(groups: dict[str, list[int]]) -> slice | None:
    """The ``tof_grid`` columns as a slice (they are contiguous), or None without a grid."""
    columns = groups.get("tof_grid")
    if not columns:
        return None
    if columns != list(range(columns[0], columns[-1] + 1)):
        raise ValueError("the tof_grid feature columns are not contiguous")
    return slice(columns[0], columns[-1] + 1)


def grid_codes(features: np.ndarray, grid: slice) -> np.ndarray | None:
    """The ``tof_mode="grid"`` pixels ``features[:, grid]`` as bytes ``closeness x 255``, or
    None when some pixel is not a multiple of 1/255 (a file with fractional ToF readings), which
    ``codes / 255`` would not restore exactly. Converted in row chunks."""
    codes = np.empty((len(features), grid.stop - grid.start), dtype=np.uint8)
    for start in range(0, len(features), GRID_CHUNK_ROWS):
        closeness = features[start : start + GRID_CHUNK_ROWS, grid]
        scaled = np.rint(closeness * np.float32(GRID_SCALE))
        if not ((scaled >= 0) & (scaled <= GRID_SCALE)).all():
            return None
        chunk = scaled.astype(np.uint8)
        if not np.array_equal(np.divide(chunk, np.float32(GRID_SCALE), dtype=np.float32), closeness):
            return None
        codes[start : start + len(chunk)] = chunk
    return codes


# ---------------------------------------------------------------- building
def _sequence_runs(frame: pl.DataFrame) -> pl.DataFrame:
    """Sort rows by (sequence_id, sequence_counter) unless each sequence is already contiguous and ordered."""
    runs = frame["sequence_id"].rle_id()
    n_runs = int(runs[-1]) + 1 if len(runs) else 0
    ordered = frame["sequence_counter"].diff().fill_null(1)
    new_run = runs.diff().fill_null(1) != 0
    if n_runs == frame["sequence_id"].n_unique() and bool(((ordered > 0) | new_run).all()):
        return frame
    logger.info("rows are not grouped by sequence in counter order; sorting them")
    return frame.sort(["sequence_id", "sequence_counter"], maintain_order=True)


def _as_sensor_values(column: pl.Series) -> pl.Series:
    """A sensor column as float32, or as it is when it holds integer ToF readings."""
    if column.name.startswith("tof_") and column.dtype.is_integer():
        return column
    return column.cast(pl.Float32)


def build_sequence_table(
    frame: pl.DataFrame,
    demographics: pl.DataFrame,
    settings: FeatureSettings,
    demographics_source: str = "the demographics",
    keep_sensors: bool = False,
    sensor_source: str | None = None,
) -> SequenceTable:
    """Features of every sequence of a train- or test-format frame.

    ``frame`` needs sequence_id, sequence_counter, subject and ``settings.sensor_columns``;
    gesture and orientation are used when present. Each sequence's rows hold one subject,
    gesture and orientation (another value on a later row raises ``DataFileError`` naming the
    sequence). ``demographics`` must cover every subject; a field outside its range is unknown
    (NaN, with a warning: ``codes.common.demographics``). ``keep_sensors`` keeps the raw sensor
    rows (``SequenceTable.sensors``). With ``sensor_source`` (the file the frame was read from),
    one warning counts the readings taken as missing for lying outside their physical range, per
    column group (:func:`warn_about_impossible_readings`).
    """
    check_columns(
        Path("<frame>"),
        frame.columns,
        ["sequence_id", "sequence_counter", "subject", *settings.sensor_columns],
    )
    if frame.height == 0:
        raise DataFileError("the frame holds no rows")
    frame = _sequence_runs(frame)
    refuse_varying_labels(frame)
    run_lengths = frame["sequence_id"].rle()
    lengths = run_lengths.struct.field("len").to_numpy().astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    meta = [c for c in ("sequence_id", "subject", "gesture", "orientation") if c in frame.columns]
    firsts = frame.select(meta)[offsets[:-1].tolist()]  # one row per sequence, labels only
    check_demographics_cover(firsts["subject"], demographics, demographics_source)
    per_sequence = firsts.select("subject").join(
        demographics, on="subject", how="left", maintain_order="left"
    )
    demo = per_sequence.select(DEMOGRAPHIC_FIELDS).cast(pl.Float32).to_numpy()
    demo = out_of_range_as_unknown(demo, firsts["subject"].to_list(), demographics_source)
    handedness = demo[:, DEMOGRAPHIC_FIELDS.index("handedness")]
    if np.isnan(handedness).any():
        logger.warning(
            "%d sequence(s) have no handedness; they are taken as right-handed",
            int(np.isnan(handedness).sum()),
        )
    left_handed = handedness == 0  # NaN compares False: unknown handedness is not mirrored

    # float32 as the CSV reader gives; integer ToF columns (the reader's int16) are kept
    sensors = pl.DataFrame([_as_sensor_values(frame.get_column(c)) for c in settings.sensor_columns])
    step = compute_step_features(sensors, offsets, left_handed, settings)
    if sensor_source is not None:
        warn_about_impossible_readings(step.impossible_counts, sensor_source)
        log_masked_tof_frames(step.impossible_counts, sensor_source)
    names, groups = feature_layout(settings)

    if "gesture" in frame.columns:
        labels = np.array([GESTURE_TO_INDEX.get(g, -1) for g in firsts["gesture"].to_list()], dtype=np.int64)
    else:
        labels = np.full(len(lengths), -1, dtype=np.int64)
    orientations = firsts["orientation"].fill_null("") if "orientation" in frame.columns else None
    return SequenceTable(
        sequence_ids=firsts["sequence_id"].to_numpy().astype(str),
        subjects=firsts["subject"].to_numpy().astype(str),
        offsets=offsets,
        features=step.features,
        step_valid=step.step_valid,
        feature_present=step.feature_present,
        demographics=demo.astype(np.float32),
        labels=labels,
        orientations=(
            orientations.to_numpy().astype(str) if orientations is not None else np.full(len(lengths), "")
        ),
        feature_names=names,
        feature_groups=groups,
        sensors=sensor_rows(sensors) if keep_sensors else None,
    )


IMPOSSIBLE_READING_GROUPS = ("acc", "rot", "thm", "tof")


def warn_about_impossible_readings(counts: dict[str, int], source: str) -> None:
    """One warning with the count of readings of ``source`` taken as missing for lying outside
    their physical range (``features.impossible_readings``), per column group; none when there
    are none."""
    total = sum(counts.get(group, 0) for group in IMPOSSIBLE_READING_GROUPS)
    if not total:
        return
    logger.warning(
        "%s: %s sensor value(s) are physically impossible, taken as missing (%s; the ranges: "
        "docs/data.md, Per-step features)",
        source,
        f"{total:,}",
        ", ".join(f"{group} {counts.get(group, 0):,}" for group in IMPOSSIBLE_READING_GROUPS),
    )


def log_masked_tof_frames(counts: dict[str, int], source: str) -> None:
    """One log line with the count of ToF frames ``tof_mode="grid"`` masks: not read (a null,
    NaN or out-of-range pixel) and blank (no reflection at any pixel); none when there are none."""
    unread, blank = counts.get("tof_unread_frames", 0), counts.get("tof_blank_frames", 0)
    if unread or blank:
        logger.info(
            "%s: %s ToF frame(s) masked in the grid: %s not read (null, NaN or out of range), "
            "%s blank (all -1, flagged blank) (tof_mode=grid, docs/data.md)",
            source,
            f"{unread + blank:,}",
            f"{unread:,}",
            f"{blank:,}",
        )


def refuse_varying_labels(frame: pl.DataFrame) -> None:
    """Raise ``DataFileError`` naming the first sequence whose rows hold more than one value of
    a column of :data:`ONE_VALUE_PER_SEQUENCE` (``frame``: each sequence's rows contiguous)."""
    columns = [c for c in ONE_VALUE_PER_SEQUENCE if c in frame.columns]
    if not columns:
        return
    ids = pl.col("sequence_id")
    changes = [pl.col(c).ne_missing(pl.col(c).shift(1)) for c in columns]
    varying = frame.select(((ids == ids.shift(1)) & pl.any_horizontal(changes)).fill_null(False).arg_true())
    if varying.is_empty():
        return
    row = int(varying.item(0, 0))
    column = next(c for c in columns if frame[c][row] != frame[c][row - 1])
    raise DataFileError(
        f"sequence {frame['sequence_id'][row]} of the frame holds more than one {column} "
        f"({frame[column][row - 1]!r}, then {frame[column][row]!r}): every row of a sequence must have "
        f"the same {', '.join(columns)} (the table takes them from one row)"
    )


def sensor_rows(sensors: pl.DataFrame) -> np.ndarray:
    """``(R, C)`` float32 raw sensor values (NaN = missing; integer ToF readings exactly, -1 kept).

    :func:`compute_step_features` gives the same features from these as from the frame.
    """
    return sensors.cast(pl.Float32).to_numpy()


def _attach_sensors(table: SequenceTable, frame: pl.DataFrame, settings: FeatureSettings) -> SequenceTable:
    """``table`` (from the cache) with the raw sensor rows of ``frame``, the file it was built from."""
    frame = _sequence_runs(frame)
    ids = frame["sequence_id"].rle().struct.field("value").to_numpy().astype(str)
    if frame.height != table.offsets[-1] or not np.array_equal(ids, table.sequence_ids):
        raise DataFileError("the cached features do not match the sensor file; delete the cache folder")
    return replace(
        table,
        sensors=sensor_rows(
            pl.DataFrame([_as_sensor_values(frame.get_column(c)) for c in settings.sensor_columns])
        ),
    )


# ---------------------------------------------------------------- cache
def file_digest(path: Path) -> str:
    """SHA-256 of a file's content, read whole every time: a file edited in place keeps no stale
    digest, even with its size and modification time restored (about 0.45 s for the full-size
    705 MB train.csv on a 2-core CPU, docs/benchmarks.md)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def split_files(data_dir: Path, split: str) -> tuple[Path, Path]:
    """The (sensor file, demographics file) of a split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data_dir = Path(data_dir)
    if split == "train":
        return data_dir / TRAIN_FILE, data_dir / TRAIN_DEMOGRAPHICS_FILE
    return data_dir / TEST_FILE, data_dir / TEST_DEMOGRAPHICS_FILE


def cache_key(data_dir: Path, split: str, settings: FeatureSettings) -> str:
    """A key over the split files' content (:func:`file_digest`), the feature settings and
    FEATURE_VERSION."""
    digests = [file_digest(p) for p in split_files(data_dir, split)]
    payload = json.dumps(
        {"split": split, "files": digests, "settings": settings.to_dict(), "version": FEATURE_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def load_sequence_table(
    data_dir: Path,
    split: str = "train",
    settings: FeatureSettings | None = None,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    keep_sensors: bool = False,
    check_units: bool = True,
) -> SequenceTable:
    """The :class:`SequenceTable` of a split, from the cache when its key matches.

    ``check_units``: train.csv or train_demographics.csv values that look recorded in another
    unit (acceleration in g, ...; ``codes.common.units``) raise a ``DataFileError`` naming the
    unit and the conversion; False turns it into a warning (test files are only warned about).
    The check runs where the CSV is parsed, so not on a cache hit; a train table built with the
    check off is therefore not cached (a cached train table is one whose units passed).

    The cache lives in ``cache_dir`` (default ``<data_dir>/cache``), keyed by :func:`cache_key`
    (the files' content, hashed on every call); an unwritable cache folder or a full disk only
    costs a warning naming the file. ``keep_sensors`` also keeps the raw sensor rows (read from the file
    even when the features come from the cache).
    """
    settings = settings or FeatureSettings()
    data_dir = Path(data_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else data_dir / "cache"
    sensor_path, demographics_path = split_files(data_dir, split)
    started = time.perf_counter()
    reader = functools.partial(read_train, check_units=check_units) if split == "train" else read_test

    def read_sensor_file() -> pl.DataFrame:
        return reader(
            data_dir,
            include_thm=settings.use_thm,
            include_tof=settings.tof_mode != "none",
            meta_columns=TABLE_META_COLUMNS,
        )

    def cached(key: str) -> SequenceTable | None:
        path = cache_dir / f"{split}-{key}.npz"
        if not path.is_file():
            return None
        table = SequenceTable.load(path)
        logger.info(
            "loaded %s sequences of %s from cache in %.2f s",
            table.n_sequences,
            sensor_path.name,
            time.perf_counter() - started,
        )
        return table

    cache_path = None
    if not use_cache:
        frame = read_sensor_file()
    else:
        for path in (sensor_path, demographics_path):  # a clear error before hashing
            require_file(path)
        if any(cache_dir.glob(f"{split}-*.npz")):  # a cached table may match: parse only on a miss
            key = cache_key(data_dir, split, settings)
            if (table := cached(key)) is not None:
                return _attach_sensors(table, read_sensor_file(), settings) if keep_sensors else table
            frame = read_sensor_file()
        else:  # nothing cached for this split yet: hash the files while the CSV is parsed
            with ThreadPoolExecutor(max_workers=1) as pool:
                pending_key = pool.submit(cache_key, data_dir, split, settings)
                frame = read_sensor_file()
                key = pending_key.result()
        cache_path = cache_dir / f"{split}-{key}.npz"
    demographics = read_demographics(demographics_path, check_units=check_units and split == "train")
    table = build_sequence_table(
        frame,
        demographics,
        settings,
        f"{demographics_path} (subjects of {sensor_path})",
        keep_sensors,
        sensor_source=str(sensor_path),
    )
    logger.info(
        "built %s sequences of %s in %.2f s",
        table.n_sequences,
        sensor_path.name,
        time.perf_counter() - started,
    )
    if cache_path is not None and not check_units and split == "train":
        logger.info("not caching the features: train.csv was read with the unit check off (data.check_units)")
    elif cache_path is not None:
        try:
            table.save(cache_path)
        except OSError as error:  # the message names the file (atomic_path)
            logger.warning("the feature cache was not written (the next load builds it again): %s", error)
    return table


# ---------------------------------------------------------------- padding and normalisation
@dataclass
class PaddedSequences:
    """Fixed-length arrays: the LAST ``max_len`` steps of each sequence, zero-padded at the end."""

    features: np.ndarray  # (N, L, F) float32, 0 at padded steps
    mask: np.ndarray  # (N, L) bool, True = real step
    step_valid: np.ndarray  # (N, L) bool, True = real step whose IMU reading was present


def pad_sequences(table: SequenceTable, max_len: int, features: np.ndarray | None = None) -> PaddedSequences:
    """Truncate to the last ``max_len`` steps (the gesture is at the end) and pad the rest.

    ``features`` replaces ``table.features`` (e.g. normalised ones) when given.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    features = table.features if features is None else features
    lengths = table.lengths
    kept = np.minimum(lengths, max_len)
    starts = table.offsets[1:] - kept  # (N,)
    positions = np.arange(max_len)
    mask = positions[None, :] < kept[:, None]  # (N, L)
    rows = np.where(mask, starts[:, None] + positions[None, :], 0)  # (N, L)
    padded = features[rows]  # (N, L, F)
    padded[~mask] = 0.0
    return PaddedSequences(features=padded, mask=mask, step_valid=table.step_valid[rows] & mask)


def pad_step_flags(flags: list[np.ndarray], max_len: int) -> np.ndarray:
    """``(N, max_len)`` bool: per-step flags of N sequences (e.g. shaken steps) cut and padded as
    :func:`pad_sequences` cuts and pads the features (the last ``max_len`` steps, False after)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    out = np.zeros((len(flags), max_len), dtype=bool)
    for i, steps in enumerate(flags):
        kept = np.asarray(steps, dtype=bool)[-max_len:]
        out[i, : len(kept)] = kept
    return out


def _absent_as_nan(features: np.ndarray, feature_present: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    absent = ~np.repeat(feature_present, lengths, axis=0)
    return np.where(absent, np.float32(np.nan), features)


class FeatureNormalizer:
    """Per-feature standardisation fitted on real steps of sequences where the feature was read.

    Wraps ``sklearn.preprocessing.StandardScaler`` (absent features enter the fit as NaN, which
    it ignores). A feature no sequence of the fit has (e.g. every thermopile and ToF feature of
    IMU-only data) gets the neutral statistics, mean 0 and scale 1, without a mean or variance
    taken over no value (numpy's "invalid value encountered in divide"); so do the fixed-scale
    columns (``feature_groups["fixed_scale"]``: the ``tof_mode="grid"`` pixels and flags).
    ``transform`` maps absent features to 0, the training mean.
    """

    def __init__(self) -> None:
        self.scaler = StandardScaler()

    @staticmethod
    def _rows_with_absent_as_nan(table: SequenceTable) -> np.ndarray:
        return _absent_as_nan(table.features, table.feature_present, table.lengths)

    def fit(self, table: SequenceTable) -> FeatureNormalizer:
        """Fit on every row of ``table`` (pass the training fold's subset)."""
        rows = self._rows_with_absent_as_nan(table)
        # a feature no sequence of the fit has (all NaN) enters as zeros, not as a mean over
        # nothing, and gets the neutral statistics; the other columns' statistics are unchanged
        unread = ~table.feature_present.any(axis=0)  # (F,)
        # fixed-scale columns (tof_mode=grid: closeness pixels and validity flags) keep their
        # values: 0 stays "masked"
        unread[table.feature_groups.get("fixed_scale", [])] = True
        rows[:, unread] = 0.0
        self.scaler.fit(rows)
        self.scaler.mean_[unread] = 0.0
        self.scaler.scale_ = np.where(
            np.isfinite(self.scaler.scale_) & (self.scaler.scale_ > 0) & ~unread, self.scaler.scale_, 1.0
        )
        return self

    def transform(self, table: SequenceTable) -> np.ndarray:
        """Normalised ``(R, F)`` float32 features of ``table``; absent features are 0."""
        return self.transform_rows(table.features, table.feature_present, table.lengths)

    def transform_rows(
        self, features: np.ndarray, feature_present: np.ndarray, lengths: np.ndarray
    ) -> np.ndarray:
        """:meth:`transform` of rows ``(R, F)`` of sequences of ``lengths`` (N,) with ``feature_present`` (N, F)."""
        scaled = self.scaler.transform(_absent_as_nan(features, feature_present, lengths))
        return np.nan_to_num(scaled, nan=0.0).astype(np.float32)

    def state_dict(self) -> dict[str, list[float]]:
        return {"mean": self.scaler.mean_.tolist(), "scale": self.scaler.scale_.tolist()}

    @classmethod
    def from_state_dict(cls, state: dict[str, list[float]]) -> FeatureNormalizer:
        normalizer = cls()
        normalizer.scaler.mean_ = np.asarray(state["mean"], dtype=np.float64)
        normalizer.scaler.scale_ = np.asarray(state["scale"], dtype=np.float64)
        normalizer.scaler.var_ = normalizer.scaler.scale_**2
        normalizer.scaler.n_features_in_ = len(normalizer.scaler.mean_)
        return normalizer

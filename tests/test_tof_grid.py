"""The ToF grid features (``tof_mode="grid"``) and exp021's spatial branch: masks, missing
sensors, mirroring, the compact cache and the modality drop-out."""

from __future__ import annotations

import importlib
import logging

import numpy as np
import polars as pl
import pytest
import torch

from codes.common.features import FeatureSettings, compute_step_features, feature_layout
from codes.common.schema import GRAVITY, SENSOR_COLUMNS, TOF_COLUMNS_BY_SENSOR
from codes.common.sequences import FeatureNormalizer, SequenceTable, build_sequence_table
from codes.inference.predictor import EnsemblePredictor, FoldMember
from codes.models.spatial import SpatialSensorEncoder
from tests.helpers import experiment_config, make_demographics, make_frame, rest_sensors
from tests.test_host_syncs import RecordOps

GRID = FeatureSettings(tof_mode="grid")
COLUMN = {c: i for i, c in enumerate(SENSOR_COLUMNS)}
TOLERANCE = 1e-6


def frame_columns(k: int) -> slice:
    """The 64 raw columns of ToF sensor k in SENSOR_COLUMNS."""
    return slice(COLUMN[f"tof_{k}_v0"], COLUMN[f"tof_{k}_v63"] + 1)


def rest_rows(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rest_sensors(np.array([1.0, 0, 0, 0]), np.array([0, 0, GRAVITY]), n, rng)


def grid_table(sensor_list, left_handed=frozenset(), settings=GRID) -> SequenceTable:
    sequences = [(f"SEQ_{i:06d}", f"SUBJ_{i:06d}", s) for i, s in enumerate(sensor_list)]
    frame = make_frame(sequences, gestures=["Wave hello"] * len(sequences))
    demographics = make_demographics([s for _, s, _ in sequences], set(left_handed))
    return build_sequence_table(frame, demographics, settings)


def sensor_grids(table: SequenceTable, row: int) -> np.ndarray:
    """(5, 8, 8) closeness grids of one row."""
    return table.features[row, table.feature_groups["tof_grid"]].reshape(5, 8, 8)


def flags(table: SequenceTable, group: str) -> np.ndarray:
    return table.features[:, table.feature_groups[group]]


# ---------------------------------------------------------------- features
def test_grid_pixels_are_closeness_and_unread_or_blank_frames_are_masked_not_filled(caplog):
    sensors = rest_rows(6)
    sensors[:, frame_columns(1)] = 100
    sensors[:, COLUMN["tof_1_v0"]] = 0  # nearest
    sensors[:, COLUMN["tof_1_v1"]] = 254  # farthest reading
    sensors[:, COLUMN["tof_1_v2"]] = -1  # no reflection
    sensors[:, frame_columns(2)] = -1  # blank at every step
    sensors[2, frame_columns(3)] = np.nan  # not read at step 2 only
    sensors[1, COLUMN["tof_4_v10"]] = 300  # out of range: the frame of step 1 is not a reading
    sensors[:, frame_columns(5)] = np.nan  # sensor 5 absent from the sequence
    sensors[3, COLUMN["thm_2"]] = np.nan
    sequence = [(f"SEQ_{0:06d}", "SUBJ_000000", sensors)]
    frame = make_frame(sequence, gestures=["Wave hello"])
    step = compute_step_features(
        frame.select(GRID.sensor_columns).with_columns(pl.all().cast(pl.Float32)),
        np.array([0, 6]),
        np.array([False]),
        GRID,
    )
    assert step.impossible_counts["tof_blank_frames"] == 6  # tof_2 at each step
    assert step.impossible_counts["tof"] == 1
    assert step.impossible_counts["tof_unread_frames"] == 6 + 1 + 1  # tof_5 throughout, tof_3, tof_4
    with caplog.at_level(logging.INFO, logger="codes.common.sequences"):
        build_sequence_table(frame, make_demographics(["SUBJ_000000"]), GRID, sensor_source="train.csv")
    assert (
        "14 ToF frame(s) masked in the grid: 8 not read (null, NaN or out of range), 6 blank" in caplog.text
    )
    table = grid_table([sensors])
    grids = np.stack([sensor_grids(table, r) for r in range(6)])  # (6, 5, 8, 8)
    assert grids[:, 0, 0, 0] == pytest.approx(1.0) and grids[:, 0, 0, 1] == pytest.approx(1 / 255)
    assert (grids[:, 0, 0, 2] == 0).all() and grids[:, 0, 0, 3] == pytest.approx(155 / 255)
    valid, blank = flags(table, "tof_valid"), flags(table, "tof_blank")
    assert (valid[:, 0] == 1).all() and (blank[:, 0] == 0).all()
    assert (valid[:, 1] == 0).all() and (blank[:, 1] == 1).all() and (grids[:, 1] == 0).all()
    assert valid[:, 2].tolist() == [1, 1, 0, 1, 1, 1] and (grids[2, 2] == 0).all()  # not filled in
    assert (grids[1, 2] != 0).any()
    assert valid[:, 3].tolist() == [1, 0, 1, 1, 1, 1] and (grids[1, 3] == 0).all()
    assert (valid[:, 4] == 0).all() and (blank[:, 4] == 0).all()
    present = dict(zip(table.feature_names, table.feature_present[0], strict=True))
    assert not present["tof_5_v0_closeness"] and not present["tof_5_valid"] and present["tof_2_blank"]
    assert flags(table, "thm_valid")[:, 1].tolist() == [1, 1, 1, 0, 1, 1]
    assert (flags(table, "thm_valid")[:, [0, 2, 3, 4]] == 1).all()


def test_left_handed_wearers_get_each_grid_flipped_and_sensors_3_and_5_swapped():
    sensors = rest_rows(4, seed=1)
    pattern = np.arange(64, dtype=np.float64).reshape(8, 8)  # value = 8 x row + column
    for k in TOF_COLUMNS_BY_SENSOR:
        sensors[:, frame_columns(k)] = (pattern + 10 * k).reshape(-1)
    sensors[1, frame_columns(3)] = np.nan  # tof_3 not read at step 1
    sensors[2, COLUMN["thm_3"]] = np.nan
    right, left = grid_table([sensors]), grid_table([sensors], left_handed={"SUBJ_000000"})
    source = {1: 1, 2: 2, 3: 5, 4: 4, 5: 3}  # the sensor a left-handed wearer's reading comes from
    for row in range(4):
        got, unmirrored = sensor_grids(left, row), sensor_grids(right, row)
        for k, s in source.items():
            np.testing.assert_allclose(got[k - 1], unmirrored[s - 1][:, ::-1], atol=TOLERANCE, rtol=0)
    expected = (255 - (pattern + 10 * 3)[:, ::-1]) / 255  # tof_3's frame, columns reversed
    np.testing.assert_allclose(sensor_grids(left, 0)[4], expected, atol=TOLERANCE, rtol=0)
    assert flags(left, "tof_valid")[:, 4].tolist() == [1, 0, 1, 1]
    assert flags(left, "tof_valid")[:, 2].tolist() == [1, 1, 1, 1]
    assert flags(left, "thm_valid")[:, 4].tolist() == [1, 1, 0, 1]  # thm_3 -> thm_5
    assert flags(right, "thm_valid")[:, 2].tolist() == [1, 1, 0, 1]


def test_the_cache_stores_the_grid_as_bytes_and_restores_it_exactly(tmp_path):
    rows = [rest_rows(40, seed=s) for s in range(3)]
    rows[1][5:9, frame_columns(2)] = np.nan
    table = grid_table(rows)
    table.save(tmp_path / "grid.npz")
    loaded = SequenceTable.load(tmp_path / "grid.npz")
    assert np.array_equal(loaded.features, table.features)
    with np.load(tmp_path / "grid.npz") as stored:
        assert stored["grid_codes"].dtype == np.uint8 and stored["grid_codes"].shape == (120, 320)
        assert stored["features"].shape == (120, table.features.shape[1] - 320)
    # fractional readings are not multiples of 1/255: stored as float32, still exact
    rows[0][:, frame_columns(1)] += 0.5
    fractional = grid_table(rows)
    fractional.save(tmp_path / "fractional.npz")
    assert np.array_equal(SequenceTable.load(tmp_path / "fractional.npz").features, fractional.features)
    with np.load(tmp_path / "fractional.npz") as stored:
        assert "grid_codes" not in stored.files


def test_the_normaliser_leaves_pixels_and_flags_as_they_are_and_scales_the_rest():
    table = grid_table([rest_rows(30, seed=s) for s in range(3)])
    normalised = FeatureNormalizer().fit(table).transform(table)
    fixed = table.feature_groups["fixed_scale"]
    assert np.array_equal(normalised[:, fixed], table.features[:, fixed])
    thm = table.feature_groups["thm_values"]
    np.testing.assert_allclose(normalised[:, thm].mean(axis=0), 0.0, atol=1e-5)


# ---------------------------------------------------------------- the spatial encoder
def random_grid_batch(lengths, seed=0):
    """Grid-layout features (B, T, F): random IMU and thermopile values, random pixels, random
    0/1 flags; padded steps 0."""
    names, groups = feature_layout(GRID)
    generator = torch.Generator().manual_seed(seed)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    features = torch.randn(len(lengths), max(lengths), len(names), generator=generator)
    features[..., groups["tof_grid"]] = torch.rand(len(lengths), max(lengths), 320, generator=generator)
    for group in ("tof_valid", "tof_blank", "thm_valid"):
        columns = groups[group]
        features[..., columns] = (
            torch.rand(len(lengths), max(lengths), len(columns), generator=generator) < 0.6
        ).float()
    return features * mask[..., None], mask, groups


@pytest.mark.parametrize("pooling", ["concat", "mean"])
def test_the_encoder_gives_exactly_zero_without_readings_and_ignores_masked_frames(pooling):
    features, mask, groups = random_grid_batch([30, 24, 17])
    encoder = SpatialSensorEncoder(groups, pooling=pooling).eval()
    unread = features.clone()
    unread[0][:, groups["tof_valid"] + groups["tof_blank"] + groups["thm_valid"]] = 0.0
    with torch.no_grad():
        out = encoder(unread, mask)
        assert (out[0] == 0).all()
        assert (out[~mask] == 0).all()
        # the pixels of a masked frame and the value of an unread thermopile change nothing
        changed = unread.clone()
        grids = changed[..., groups["tof_grid"]].view(3, 30, 5, 64)
        valid = changed[..., groups["tof_valid"]]
        grids[valid == 0] = torch.rand(int((valid == 0).sum()), 64)
        changed[..., groups["tof_grid"]] = grids.view(3, 30, 320)
        thm, thm_valid = groups["thm_values"], groups["thm_valid"]
        changed[..., thm] = torch.where(changed[..., thm_valid] == 0, 99.0, changed[..., thm])
        torch.testing.assert_close(encoder(changed, mask), out, atol=TOLERANCE, rtol=0)
        # ... while a read frame's pixels do (the property is not vacuous)
        read = unread.clone()
        step = int(torch.nonzero(read[1, :, groups["tof_valid"][0]] > 0)[0])
        read[1, step, groups["tof_grid"][:64]] = 1.0 - read[1, step, groups["tof_grid"][:64]]
        assert (encoder(read, mask)[1, step] - out[1, step]).abs().max() > 1e-4
        # padded steps: any values there change nothing
        garbage = unread.clone()
        garbage[~mask] = 7.0
        torch.testing.assert_close(encoder(garbage, mask), out, atol=TOLERANCE, rtol=0)


def exp021_model(fusion: str, *overrides: str):
    cfg = experiment_config(
        "exp021", "variant=smoke", "machine=cpu", f"model.spatial.fusion={fusion}", *overrides
    )
    names, _ = feature_layout(importlib.import_module("codes.exp.exp021.dataset").feature_settings(cfg.data))
    torch.manual_seed(0)
    return importlib.import_module("codes.exp.exp021.model").build_model(cfg, len(names)).eval()


@pytest.mark.parametrize(("fusion", "statistics"), [("early", "false"), ("mid", "false"), ("mid", "true")])
def test_a_sequence_without_thermopiles_or_tof_gets_exactly_the_imu_only_input(fusion, statistics):
    model = exp021_model(fusion, f"model.spatial.early_statistics={statistics}")
    features, mask, groups = random_grid_batch([40, 31])
    non_imu = groups["thm"] + groups["tof"]
    unread = features.clone()  # readings' values still there, every flag 0
    unread[..., groups["tof_valid"] + groups["tof_blank"] + groups["thm_valid"]] = 0.0
    imu_only = features.clone()
    imu_only[..., non_imu] = 0.0
    demographics = torch.tensor([[1.0, 30.0, 0.0, 1.0, 170.0, 55.0, 30.0]]).repeat(2, 1)
    seen = []
    model.input_projection.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    with torch.no_grad():
        got, expected = model(unread, mask, demographics), model(imu_only, mask, demographics)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=TOLERANCE, rtol=0)
    n_imu = len(groups["imu"])
    assert torch.equal(seen[0][..., :n_imu], features[..., groups["imu"]])
    assert (seen[0][..., n_imu:] == 0).all()  # early: the branch adds zeros; mid: it adds nothing
    with torch.no_grad():  # and with readings the branch does change the answer
        assert (
            model(features, mask, demographics)["gesture_logits"] - expected["gesture_logits"]
        ).abs().max() > 1e-5


def test_the_modality_drop_out_zeroes_one_modality_both_or_none_exclusively():
    drop_modalities = importlib.import_module("codes.exp.exp021.dataset").drop_modalities
    features, _, groups = random_grid_batch([8] * 4000)
    features = features + 1.0  # no column starts at 0
    thm, tof, imu = groups["thm"], groups["tof"], groups["imu"]
    for probs, expect_thm, expect_tof in (
        ((1, 0, 0), True, True),
        ((0, 1, 0), False, True),
        ((0, 0, 1), True, False),
    ):
        out = drop_modalities(features, groups, probs, torch.Generator().manual_seed(0))
        assert torch.equal(out[..., imu], features[..., imu])
        assert (out[..., thm] == 0).all() if expect_thm else torch.equal(out[..., thm], features[..., thm])
        assert (out[..., tof] == 0).all() if expect_tof else torch.equal(out[..., tof], features[..., tof])
    out = drop_modalities(features, groups, (0.5, 0.15, 0.15), torch.Generator().manual_seed(1))
    no_thm, no_tof = (out[:, 0, thm] == 0).all(dim=1), (out[:, 0, tof] == 0).all(dim=1)
    shares = [
        (no_thm & no_tof).float().mean(),
        (no_tof & ~no_thm).float().mean(),
        (no_thm & ~no_tof).float().mean(),
    ]
    for share, expected in zip(shares, (0.5, 0.15, 0.15), strict=True):
        assert abs(float(share) - expected) < 0.03  # 4000 draws: 3 standard deviations is 0.024
    assert torch.equal(out[~(no_thm | no_tof)], features[~(no_thm | no_tof)])


def test_a_served_sequence_with_some_tof_sensors_missing_is_answered_with_them_masked():
    model = exp021_model("early")
    table = grid_table([rest_rows(40, seed=s) for s in range(3)])
    predictor = EnsemblePredictor(
        [FoldMember(0, model, FeatureNormalizer().fit(table))], GRID, max_len=64, strict=True
    )
    sensors = rest_rows(40, seed=5)
    sensors[:, frame_columns(2)] = np.nan  # tof_2 missing throughout
    sensors[:, frame_columns(4)] = -1  # tof_4 blank throughout
    sequence = make_frame([("SEQ_000009", "SUBJ_000009", sensors)])
    demographics = make_demographics(["SUBJ_000009"])
    served = predictor.sequence_table(sequence, demographics)
    assert (flags(served, "tof_valid")[:, [1, 3]] == 0).all() and (
        flags(served, "tof_valid")[:, [0, 2, 4]] == 1
    ).all()
    assert (flags(served, "tof_blank")[:, 3] == 1).all()
    probabilities = predictor.predict_probabilities(sequence, demographics)
    assert probabilities is not None and np.isfinite(probabilities).all()
    assert predictor.predict(sequence, demographics) in set(
        importlib.import_module("codes.common.schema").GESTURES
    )
    # the missing sensor's readings cannot matter: other values there give the same answer
    other = sensors.copy()
    other[:, frame_columns(2)] = 300  # out of range: not a reading either
    np.testing.assert_allclose(
        predictor.predict_probabilities(make_frame([("SEQ_000009", "SUBJ_000009", other)]), demographics),
        probabilities,
        atol=TOLERANCE,
        rtol=0,
    )


def test_integer_readings_take_the_byte_path_to_the_same_features_as_floats():
    """The CSV reader gives integer ToF columns (int16): the grid is built from bytes, and must
    equal the float path bit for bit, mirrored rows, blank and unread frames included."""
    rows = [rest_rows(12, seed=s) for s in range(3)]
    rows[0][:, frame_columns(2)] = -1  # blank
    rows[1][3:5, frame_columns(3)] = np.nan  # not read
    sequences = [(f"SEQ_{i:06d}", f"SUBJ_{i:06d}", r) for i, r in enumerate(rows)]
    frame = make_frame(sequences, gestures=["Wave hello"] * 3)
    demographics = make_demographics([s for _, s, _ in sequences], {"SUBJ_000001"})
    tof = [c for c in frame.columns if c.startswith("tof_")]
    as_floats = build_sequence_table(frame, demographics, GRID)
    as_integers = build_sequence_table(frame.with_columns(pl.col(tof).cast(pl.Int16)), demographics, GRID)
    assert np.array_equal(as_integers.features, as_floats.features)
    assert np.array_equal(as_integers.feature_present, as_floats.feature_present)


@pytest.mark.parametrize("training", [True, False])
def test_off_the_cpu_the_encoder_runs_every_frame_reads_nothing_back_and_gives_the_same_outputs(training):
    """On a GPU (or compiling) the CNN runs on every frame instead of gathering the read ones
    (a gather reads their count back to the host): no syncing op, the same outputs."""
    features, mask, groups = random_grid_batch([30, 24, 17])
    encoder = SpatialSensorEncoder(groups).train(training)
    torch.manual_seed(0)
    gathered = encoder(features, mask)
    assert encoder.gathers(features) and not encoder.gathers(features.to("meta"))
    encoder.gathers = lambda _: False  # the path a CUDA tensor takes, on the CPU
    with RecordOps() as recorded:
        dense = encoder(features.requires_grad_(training), mask)
        if training:
            dense.square().sum().backward()
    assert recorded.syncing() == []
    torch.testing.assert_close(dense, gathered, atol=1e-5, rtol=1e-5)

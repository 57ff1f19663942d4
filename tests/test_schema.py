"""The schema module and handedness mirroring."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from codes.common import schema


def test_column_counts_and_order():
    assert len(schema.TRAIN_COLUMNS) == 341
    assert len(schema.TEST_COLUMNS) == 336
    assert schema.TRAIN_COLUMNS[:9] == schema.TRAIN_META_COLUMNS
    assert schema.TRAIN_COLUMNS[9:16] == ["acc_x", "acc_y", "acc_z", "rot_w", "rot_x", "rot_y", "rot_z"]
    assert schema.TRAIN_COLUMNS[-1] == "tof_5_v63"
    assert schema.LABEL_COLUMNS == ["sequence_type", "orientation", "behavior", "phase", "gesture"]


def test_gesture_orientation_pairs():
    assert len(schema.GESTURES) == 18 and len(schema.TARGET_GESTURES) == 8
    assert len(schema.GESTURE_ORIENTATION_PAIRS) == 51
    pairs = set(schema.GESTURE_ORIENTATION_PAIRS)
    assert ("Drink from bottle/cup", "Lie on Back") not in pairs
    assert ("Wave hello", "Seated Lean Non Dom - FACE DOWN") not in pairs
    assert ("Write name on leg", "Seated Lean Non Dom - FACE DOWN") in pairs


@settings(max_examples=25, deadline=None)
@given(arrays(np.float32, (3, len(schema.SENSOR_COLUMNS)), elements=st.floats(-300, 300, width=32)))
def test_mirroring_twice_is_the_identity(sensors):
    assert np.array_equal(schema.mirror_sensors(schema.mirror_sensors(sensors)), sensors)


def test_mirroring_moves_the_documented_columns():
    sensors = np.arange(len(schema.SENSOR_COLUMNS), dtype=np.float64)[None, :]
    mirrored = schema.mirror_sensors(sensors)[0]
    col = {c: i for i, c in enumerate(schema.SENSOR_COLUMNS)}
    assert mirrored[col["acc_x"]] == -sensors[0, col["acc_x"]]
    assert mirrored[col["acc_y"]] == sensors[0, col["acc_y"]]
    assert (
        mirrored[col["rot_y"]] == -sensors[0, col["rot_y"]]
        and mirrored[col["rot_z"]] == -sensors[0, col["rot_z"]]
    )
    assert (
        mirrored[col["thm_3"]] == sensors[0, col["thm_5"]]
        and mirrored[col["thm_1"]] == sensors[0, col["thm_1"]]
    )
    # tof_3 pixel (row 2, col 0) comes from tof_5 pixel (row 2, col 7)
    assert mirrored[col["tof_3_v16"]] == sensors[0, col["tof_5_v23"]]
    assert mirrored[col["tof_1_v0"]] == sensors[0, col["tof_1_v7"]]


def test_mirroring_a_subset_needs_both_sides_of_a_swap():
    columns = schema.IMU_COLUMNS + schema.THM_COLUMNS
    x = np.random.default_rng(0).normal(size=(4, len(columns)))
    assert np.allclose(schema.mirror_sensors(schema.mirror_sensors(x, columns), columns), x)
    try:
        schema.mirror_permutation(["thm_3"])
    except ValueError as error:
        assert "thm_5" in str(error)
    else:
        raise AssertionError("expected a ValueError")

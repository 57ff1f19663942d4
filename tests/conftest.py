"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from codes.common.schema import GESTURES
from tests.helpers import make_demographics, make_frame, rest_sensors, write_dataset


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """6 subjects x 18 gestures in the competition format; each gesture a different noise level."""
    directory = tmp_path_factory.mktemp("toy_data")
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

"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import write_toy_data


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """6 subjects x 18 gestures in the competition format; each gesture a different noise level."""
    return write_toy_data(tmp_path_factory.mktemp("toy_data"))

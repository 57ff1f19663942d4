"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import write_toy_data


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """6 subjects x 18 gestures in the competition format; each gesture a different noise level."""
    return write_toy_data(tmp_path_factory.mktemp("toy_data"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small models on a shared 2-core machine: one thread avoids contention between workers.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_terminal_summary(terminalreporter) -> None:
    """Which comparison each pinned run made (bit for bit, or at tolerance and why)."""
    import sys

    pinned = sys.modules.get("tests.pinned_runs")
    if pinned is not None and pinned.COMPARISONS:
        terminalreporter.section("pinned runs")
        for line in pinned.COMPARISONS:
            terminalreporter.write_line(line)

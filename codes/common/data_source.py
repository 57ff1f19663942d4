"""Where the data comes from: the competition files in ``data/``, or the synthetic stand-in."""

from __future__ import annotations

import logging
from pathlib import Path

from codes.common.data_files import (
    TEST_DEMOGRAPHICS_FILE,
    TEST_FILE,
    TRAIN_DEMOGRAPHICS_FILE,
    TRAIN_FILE,
    DataFileError,
)
from codes.common.schema import KAGGLE_DOWNLOAD_COMMAND

logger = logging.getLogger(__name__)

DATA_SOURCES = ("auto", "competition", "synthetic")
COMPETITION_FILES = (TRAIN_FILE, TRAIN_DEMOGRAPHICS_FILE, TEST_FILE, TEST_DEMOGRAPHICS_FILE)


def has_competition_files(directory: Path) -> bool:
    return all((Path(directory) / name).is_file() for name in (TRAIN_FILE, TRAIN_DEMOGRAPHICS_FILE))


def resolve_data_dir(
    source: str = "auto",
    competition_dir: Path = Path("data"),
    synthetic_dir: Path = Path("data/synthetic"),
    synthetic_subjects: int = 20,
    synthetic_seed: int = 0,
) -> Path:
    """The folder holding train.csv and friends.

    ``competition``: ``competition_dir`` must hold the competition files (strict, no fallback).
    ``synthetic``: the synthetic dataset in ``synthetic_dir``, generated on first use.
    ``auto``: the competition files when present, otherwise the synthetic dataset, with a message.
    """
    if source not in DATA_SOURCES:
        raise ValueError(f"data source must be one of {DATA_SOURCES}, got {source!r}")
    competition_dir, synthetic_dir = Path(competition_dir), Path(synthetic_dir)
    if source in ("auto", "competition") and has_competition_files(competition_dir):
        logger.info("using the competition data in %s", competition_dir)
        return competition_dir
    if source == "competition":
        missing = [n for n in COMPETITION_FILES if not (competition_dir / n).is_file()]
        raise DataFileError(
            f"data source 'competition' asked for, but {competition_dir} lacks {missing}.\n"
            f"Download it with:\n  {KAGGLE_DOWNLOAD_COMMAND}\n"
            "or use the synthetic stand-in (data.source=synthetic)."
        )
    if not has_competition_files(synthetic_dir):
        from codes.common.synthetic import generate_dataset

        logger.warning(
            "no competition data in %s: generating the synthetic stand-in (%d subjects, seed %d) in %s",
            competition_dir,
            synthetic_subjects,
            synthetic_seed,
            synthetic_dir,
        )
        generate_dataset(synthetic_dir, n_subjects=synthetic_subjects, seed=synthetic_seed)
    elif source == "auto":
        logger.warning(
            "no competition data in %s: using the synthetic stand-in in %s", competition_dir, synthetic_dir
        )
    return synthetic_dir

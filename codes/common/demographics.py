"""The demographics rule shared by training and inference: a field outside its range is unknown.

``adult_child``, ``sex`` and ``handedness`` take 0 or 1 only; the continuous fields the generous
``schema.DEMOGRAPHIC_RANGES``. A field outside is set to NaN (unknown: the demographics encoder
maps it to its "unknown" inputs; unknown handedness is not mirrored), with one warning naming
the subjects and fields. Valid values are untouched, bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from codes.common.schema import BINARY_DEMOGRAPHIC_FIELDS, DEMOGRAPHIC_FIELDS, DEMOGRAPHIC_RANGES

logger = logging.getLogger(__name__)

_SHOWN_SUBJECTS = 5


def out_of_range_demographics(values: np.ndarray) -> np.ndarray:
    """``(N, 7)`` DEMOGRAPHIC_FIELDS -> ``(N, 7)`` bool: fields outside their range (NaN is not flagged)."""
    flags = np.zeros(values.shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        for i, field in enumerate(DEMOGRAPHIC_FIELDS):
            column = values[:, i]
            if field in BINARY_DEMOGRAPHIC_FIELDS:
                flags[:, i] = ~np.isnan(column) & (column != 0) & (column != 1)
            elif field in DEMOGRAPHIC_RANGES:
                low, high = DEMOGRAPHIC_RANGES[field]
                flags[:, i] = (column < low) | (column > high)
    return flags


def out_of_range_as_unknown(values: np.ndarray, subjects: Sequence[str], source: str) -> np.ndarray:
    """``values`` (N, 7) with every field outside its range set to NaN (a copy only when one is).

    ``subjects`` (N,) names the rows: one warning lists the subjects and fields taken as unknown.
    """
    flags = out_of_range_demographics(values)
    if not flags.any():
        return values
    subjects = np.asarray(subjects, dtype=object)
    rows = np.flatnonzero(flags.any(axis=1))
    odd = list(dict.fromkeys(str(s) for s in subjects[rows]))  # unique, in order
    fields = [f for i, f in enumerate(DEMOGRAPHIC_FIELDS) if flags[:, i].any()]
    example = rows[0]
    shown = ", ".join(
        f"{f}={values[example, DEMOGRAPHIC_FIELDS.index(f)]:g}"
        for f in fields
        if flags[example, DEMOGRAPHIC_FIELDS.index(f)]
    )
    logger.warning(
        "%s: %d subject(s) have demographics fields out of range, taken as unknown: %s%s (%s; e.g. %s: %s)%s",
        source,
        len(odd),
        ", ".join(odd[:_SHOWN_SUBJECTS]),
        ", ..." if len(odd) > _SHOWN_SUBJECTS else "",
        ", ".join(fields),
        subjects[example],
        shown,
        "; handedness unknown: not mirrored" if "handedness" in fields else "",
    )
    values = values.copy()
    values[flags] = np.nan
    return values

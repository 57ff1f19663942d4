"""Unit checks: values recorded in another unit than the competition's (g instead of m/s^2, ...).

Such values often lie inside the physical ranges (``schema``), so nothing else notices them: in
g, every acceleration is 9.81 times too small and trains without a word; in milli-g almost every
row is out of range and silently missing. Each :class:`UnitRule` tests the median of one
quantity, a statistic a few rows already fix, against the band it takes in the expected unit;
outside it, the other units whose band holds the median are named, with the conversion.

The rules (docs/data.md, "Units"):

- acceleration: the median |acc| (norm of acc_x/y/z over the rows where all three are read) is
  about g = 9.81 m/s^2 (band 6.5-14.7); g gives about 1, milli-g about 1000, cm/s^2 about 981,
  ft/s^2 about 32;
- thermopiles: the median temperature is 10-50 deg C; Fahrenheit gives 55-122, Kelvin 283-323;
- demographics lengths: the median height is 100-230 cm (metres, millimetres, inches), the
  median shoulder-to-wrist 25-110 cm and elbow-to-wrist 12-70 cm (metres, millimetres).

The same bands are applied per subject too (:func:`subject_unit_findings`): a subject whose own
median lies in another unit's band (acceleration in g for one subject of six) is named, though
the file's median is fine. The demographics rules are applied per row, one row per subject.

ToF (:func:`tof_scale_finding`): readings are -1 (no reflection) or 0..254; more than
``TOF_ABOVE_RANGE_SHARE`` (1%) of the read values above 254 means another scale (all exactly 255:
255 written for no reflection; else distances in another unit, e.g. x4).

This module only finds; what a finding does (an error in training, a warning in ``predict()``)
is the caller's: ``codes.common.data_files.enforce_units``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from codes.common.schema import (
    ACC_COLUMNS,
    DEMOGRAPHIC_FIELDS,
    GRAVITY,
    THM_COLUMNS,
    TOF_MAX_DISTANCE,
    TOF_NO_REFLECTION,
)

TOF_ABOVE_RANGE_SHARE = 0.01  # more read ToF values above 254 than this share: another scale
_SHOWN_SUBJECTS = 5


@dataclass(frozen=True)
class OtherUnit:
    """A unit a quantity is sometimes recorded in: where the rule's median lies then, and the fix."""

    unit: str
    typical: tuple[float, float]
    fix: str


@dataclass(frozen=True)
class UnitRule:
    """The median of ``columns`` in ``unit`` lies in ``typical``; ``others`` are the usual mistakes."""

    quantity: str
    columns: tuple[str, ...]
    unit: str
    typical: tuple[float, float]
    expected: str  # what the median is in ``unit``, in words
    others: tuple[OtherUnit, ...]
    row_norm: bool = False  # the statistic is the norm of each row (all columns read), not each value
    required: bool = False  # every subject records it: a subject without any reading is unusual

    @property
    def per_subject_statistic(self) -> str:
        if self.row_norm:
            return f"median norm of ({', '.join(self.columns)})"
        return f"median of {', '.join(self.columns)}" if len(self.columns) > 1 else self.columns[0]

    @property
    def statistic(self) -> str:
        if self.row_norm:
            return f"the median norm of ({', '.join(self.columns)})"
        return f"the median of {', '.join(self.columns)}"

    def likely_units(self, median: float) -> tuple[OtherUnit, ...]:
        return tuple(o for o in self.others if o.typical[0] <= median <= o.typical[1])


@dataclass(frozen=True)
class UnitFinding:
    """A median outside the rule's band; ``likely`` are the units that give it (may be empty)."""

    rule: UnitRule
    median: float
    n_values: int
    likely: tuple[OtherUnit, ...]

    def message(self) -> str:
        rule = self.rule
        seen = (
            f"{rule.statistic} over {self.n_values:,} {'rows' if rule.row_norm else 'values'} is "
            f"{self.median:.4g}, where {rule.unit} gives {rule.expected}"
        )
        if not self.likely:
            return (
                f"{rule.quantity} may not be in {rule.unit}: {seen}, and no usual unit gives that "
                "value; check the recording's units"
            )
        names = " or ".join(o.unit for o in self.likely)
        fixes = "; ".join(f"if {o.unit}: {o.fix}" for o in self.likely)
        return f"{rule.quantity} looks recorded in {names}, not {rule.unit}: {seen}. Convert it ({fixes})"


@dataclass(frozen=True)
class SubjectUnitFinding:
    """Subjects whose own median lies in the band of the ``likely`` units (the file's may not)."""

    rule: UnitRule
    likely: tuple[OtherUnit, ...]
    subjects: tuple[str, ...]
    medians: tuple[float, ...]
    n_subjects: int  # subjects with a value behind the rule's statistic

    def message(self) -> str:
        rule = self.rule
        names = " or ".join(o.unit for o in self.likely)
        shown = ", ".join(
            f"{s} ({m:.4g})" for s, m in zip(self.subjects[:_SHOWN_SUBJECTS], self.medians, strict=False)
        )
        more = f", ... ({len(self.subjects)} in all)" if len(self.subjects) > _SHOWN_SUBJECTS else ""
        fixes = "; ".join(f"if {o.unit}: {o.fix}" for o in self.likely)
        return (
            f"{rule.quantity} of {len(self.subjects)} of {self.n_subjects} subject(s) looks recorded in "
            f"{names}, not {rule.unit}: the {rule.per_subject_statistic} of subject{'s' if len(self.subjects) > 1 else ''} "
            f"{shown}{more}, where "
            f"{rule.unit} gives {rule.expected}. Convert those subjects' values ({fixes})"
        )


@dataclass(frozen=True)
class UnusualSubjectsFinding:
    """Subjects whose own median lies outside the rule's band where no usual unit gives it (a
    sensor stuck at a missing code such as -1, say), or, for a rule that every row must have
    (``UnitRule.required``), subjects without a single reading: a warning, never an error."""

    rule: UnitRule
    subjects: tuple[str, ...]
    medians: tuple[float, ...]  # NaN: the subject has no reading
    n_subjects: int
    likely: tuple[OtherUnit, ...] = ()  # none: only ever warned about

    def message(self) -> str:
        rule = self.rule
        shown = ", ".join(
            f"{s} ({'no reading' if np.isnan(m) else f'{m:.4g}'})"
            for s, m in zip(self.subjects[:_SHOWN_SUBJECTS], self.medians, strict=False)
        )
        more = f", ... ({len(self.subjects)} in all)" if len(self.subjects) > _SHOWN_SUBJECTS else ""
        return (
            f"{rule.quantity} of {len(self.subjects)} of {self.n_subjects} subject(s) is unusual: the "
            f"{rule.per_subject_statistic} of {shown}{more}, where {rule.unit} gives {rule.expected}. "
            "No usual unit gives such a value: check those subjects' recordings (a sensor stuck at a "
            "missing code such as -1, or one that did not record, is used as it is)"
        )


@dataclass(frozen=True)
class TofScaleFinding:
    """More than ``TOF_ABOVE_RANGE_SHARE`` of the read ToF values lie above ``TOF_MAX_DISTANCE``."""

    n_values: int
    n_above: int
    maximum: float
    all_255: bool  # every value above the range is exactly TOF_MAX_DISTANCE + 1

    @property
    def likely(self) -> tuple[str]:
        if self.all_255:
            return ("255 written for no reflection",)
        return ("another scale",)

    def message(self) -> str:
        seen = (
            f"{self.n_above:,} of {self.n_values:,} read ToF values ({self.n_above / self.n_values:.1%}) lie "
            f"above {TOF_MAX_DISTANCE}, the largest distance (readings are {TOF_NO_REFLECTION} for no "
            f"reflection or 0..{TOF_MAX_DISTANCE}; more than {TOF_ABOVE_RANGE_SHARE:.0%} means another scale)"
        )
        if self.all_255:
            return (
                f"ToF looks written with 255 for no reflection: {seen}, and all of them are exactly "
                f"{TOF_MAX_DISTANCE + 1}. The competition writes {TOF_NO_REFLECTION}: replace 255 by "
                f"{TOF_NO_REFLECTION} in the tof_* columns"
            )
        factor = math.ceil(self.maximum / TOF_MAX_DISTANCE)
        return (
            f"ToF looks recorded in another scale: {seen}, with values up to {self.maximum:g}. Convert it "
            f"(divide the tof_* distances by about {factor}, keeping {TOF_NO_REFLECTION} as it is, so that "
            f"they lie in 0..{TOF_MAX_DISTANCE})"
        )


def _acc(factor: str) -> str:
    return f"multiply acc_x, acc_y and acc_z by {factor}"


ACC_RULE = UnitRule(
    quantity="acceleration",
    columns=tuple(ACC_COLUMNS),
    unit="m/s^2",
    typical=(GRAVITY / 1.5, GRAVITY * 1.5),
    expected=f"about {GRAVITY:.2f} (gravity, 6.5-14.7)",
    others=(
        OtherUnit("g", (0.65, 1.5), _acc(f"{GRAVITY}")),
        OtherUnit("milli-g", (650.0, 1500.0), _acc(f"{GRAVITY / 1000}")),
        OtherUnit("cm/s^2", (650.0, 1500.0), _acc("0.01")),
        OtherUnit("ft/s^2", (21.3, 48.3), _acc("0.3048")),
    ),
    row_norm=True,
    required=True,
)
THM_RULE = UnitRule(
    quantity="thermopile temperature",
    columns=tuple(THM_COLUMNS),
    unit="deg C",
    typical=(10.0, 50.0),
    expected="10-50 (room and skin temperatures)",
    others=(
        OtherUnit("deg F", (55.0, 122.0), "subtract 32, then multiply by 5/9"),
        OtherUnit("Kelvin", (283.0, 323.0), "subtract 273.15"),
    ),
)


def _length_rule(field: str, typical: tuple[float, float], inches: bool = False) -> UnitRule:
    low, high = typical
    others = [
        OtherUnit("metres", (low / 100, high / 100), f"multiply {field} by 100"),
        OtherUnit("millimetres", (low * 10, high * 10), f"divide {field} by 10"),
    ]
    if inches:
        others.append(OtherUnit("inches", (low / 2.54, high / 2.54), f"multiply {field} by 2.54"))
    return UnitRule(
        quantity=field,
        columns=(field,),
        unit="cm",
        typical=typical,
        expected=f"{low:g}-{high:g}",
        others=tuple(others),
    )


SENSOR_UNIT_RULES: tuple[UnitRule, ...] = (ACC_RULE, THM_RULE)
DEMOGRAPHIC_UNIT_RULES: tuple[UnitRule, ...] = (
    _length_rule("height_cm", (100.0, 230.0), inches=True),
    _length_rule("shoulder_to_wrist_cm", (25.0, 110.0)),
    _length_rule("elbow_to_wrist_cm", (12.0, 70.0)),
)


def _statistic_values(values: np.ndarray, rule: UnitRule) -> np.ndarray:
    """The finite values the rule's median is taken over (``values``: the rule's columns)."""
    values = np.asarray(values, dtype=np.float32)  # float32 is plenty for a band check
    if rule.row_norm:
        read = np.isfinite(values).all(axis=1)
        with np.errstate(over="ignore"):  # a norm beyond float32 is inf: far outside every band
            return np.sqrt((values[read] ** 2).sum(axis=1))
    return values[np.isfinite(values)]


def unit_findings(values: np.ndarray, columns: Sequence[str], rules: Sequence[UnitRule]) -> list[UnitFinding]:
    """The rules whose median over ``values`` (R, C), columns named ``columns``, lies outside
    their band. A rule is skipped when its columns hold no finite value, or (a norm) are not all
    there."""
    index = {c: i for i, c in enumerate(columns)}
    findings = []
    for rule in rules:
        present = [index[c] for c in rule.columns if c in index]
        if not present or (rule.row_norm and len(present) < len(rule.columns)):
            continue
        statistic = _statistic_values(values[:, present], rule)
        if not len(statistic):
            continue
        median = float(np.median(statistic))
        if not rule.typical[0] <= median <= rule.typical[1]:
            findings.append(UnitFinding(rule, median, len(statistic), rule.likely_units(median)))
    return findings


def sensor_unit_findings(values: np.ndarray, columns: Sequence[str]) -> list[UnitFinding]:
    """:func:`unit_findings` of the sensor rules (acceleration, thermopiles) on raw readings
    (before the physical-range rule: in milli-g, almost every reading is out of range)."""
    return unit_findings(values, columns, SENSOR_UNIT_RULES)


def demographic_unit_findings(values: np.ndarray) -> list[UnitFinding]:
    """:func:`unit_findings` of the length rules on ``(N, 7)`` DEMOGRAPHIC_FIELDS (one row per subject)."""
    return unit_findings(values, DEMOGRAPHIC_FIELDS, DEMOGRAPHIC_UNIT_RULES)


def subject_unit_findings(frame: pl.DataFrame, rules: Sequence[UnitRule]) -> list[SubjectUnitFinding]:
    """Per rule and likely unit: the subjects whose own median over the rows of ``frame`` (a
    ``subject`` column and the rules' columns) lies outside the rule's band and inside another
    unit's (a median that no unit explains is left to :func:`unit_findings`)."""
    findings = []
    for rule in rules:
        present = [c for c in rule.columns if c in frame.columns]
        if not present or (rule.row_norm and len(present) < len(rule.columns)):
            continue
        medians = _subject_medians(frame, present, rule)
        outside = medians.filter((pl.col("median") < rule.typical[0]) | (pl.col("median") > rule.typical[1]))
        by_units: dict[tuple[OtherUnit, ...], list[tuple[str, float]]] = {}
        for subject, median in outside.iter_rows():
            if likely := rule.likely_units(median):
                by_units.setdefault(likely, []).append((subject, median))
        for likely, found in by_units.items():
            findings.append(
                SubjectUnitFinding(
                    rule, likely, tuple(s for s, _ in found), tuple(m for _, m in found), medians.height
                )
            )
    return findings


def unusual_subject_findings(frame: pl.DataFrame, rules: Sequence[UnitRule]) -> list[UnusualSubjectsFinding]:
    """Per rule, the subjects whose own median lies outside the band with no usual unit giving
    it, and, for ``required`` rules, the subjects with no reading of its columns at all."""
    findings = []
    subjects = frame["subject"].unique().sort().to_list()
    for rule in rules:
        present = [c for c in rule.columns if c in frame.columns]
        if not present or (rule.row_norm and len(present) < len(rule.columns)):
            continue
        medians = dict(_subject_medians(frame, present, rule).iter_rows())
        unusual = [
            (subject, medians.get(subject, math.nan))
            for subject in subjects
            if (subject not in medians and rule.required)
            or (
                subject in medians
                and not rule.typical[0] <= medians[subject] <= rule.typical[1]
                and not rule.likely_units(medians[subject])
            )
        ]
        if unusual:
            findings.append(
                UnusualSubjectsFinding(
                    rule, tuple(s for s, _ in unusual), tuple(m for _, m in unusual), len(subjects)
                )
            )
    return findings


def _subject_medians(frame: pl.DataFrame, columns: list[str], rule: UnitRule) -> pl.DataFrame:
    """``subject`` and the ``median`` of the rule's statistic over each subject's rows, in
    subject order (values that are null, NaN or infinite are left out)."""
    values = [pl.col(c).cast(pl.Float32) for c in columns]
    if rule.row_norm:  # null when a component is null
        statistic = frame.select("subject", sum(v * v for v in values).sqrt().alias("value"))
    else:
        statistic = frame.select("subject", *values).unpivot(index="subject", value_name="value")
    return (
        statistic.filter(pl.col("value").is_finite())
        .group_by("subject")
        .agg(pl.col("value").median().alias("median"))
        .sort("subject")
    )


def merged_unit_findings(
    file_findings: Sequence[UnitFinding], subject_findings: Sequence[SubjectUnitFinding]
) -> list[UnitFinding | SubjectUnitFinding]:
    """Per rule, the file-level findings when its subjects agree (none named, or all named in one
    unit: the file's median tells it), else the subjects' (the file's median of a mix of units
    may lie in a third unit's band)."""
    merged: list[UnitFinding | SubjectUnitFinding] = []
    for rule in dict.fromkeys([f.rule for f in file_findings] + [f.rule for f in subject_findings]):
        of_subjects = [f for f in subject_findings if f.rule == rule]
        agree = not of_subjects or (
            len(of_subjects) == 1 and len(of_subjects[0].subjects) == of_subjects[0].n_subjects
        )
        merged += [f for f in file_findings if f.rule == rule] if agree else of_subjects
    return merged


def sensor_subject_unit_findings(frame: pl.DataFrame) -> list[SubjectUnitFinding]:
    """:func:`subject_unit_findings` of the sensor rules (acceleration, thermopiles)."""
    return subject_unit_findings(frame, SENSOR_UNIT_RULES)


def sensor_unusual_subject_findings(frame: pl.DataFrame) -> list[UnusualSubjectsFinding]:
    """:func:`unusual_subject_findings` of the sensor rules (acceleration, thermopiles)."""
    return unusual_subject_findings(frame, SENSOR_UNIT_RULES)


def demographic_subject_unit_findings(frame: pl.DataFrame) -> list[SubjectUnitFinding]:
    """:func:`subject_unit_findings` of the length rules on a demographics frame, one row per
    subject: the bands applied to each subject's own value."""
    return subject_unit_findings(frame, DEMOGRAPHIC_UNIT_RULES)


def tof_scale_finding(tof: pl.DataFrame) -> TofScaleFinding | None:
    """The :class:`TofScaleFinding` of a frame of ToF columns (integers or floats), or None.

    Read values: neither null nor NaN. The column maxima are taken first: a file whose values
    all lie in range pays nothing more."""
    if tof.width == 0 or tof.height == 0:
        return None
    maxima = dict(zip(tof.columns, tof.select(pl.all().max()).row(0), strict=True))  # NaN is skipped
    over = [c for c, m in maxima.items() if m is not None and m > TOF_MAX_DISTANCE]
    if not over:
        return None
    read = [pl.col(c).is_not_null() & ~pl.col(c).cast(pl.Float32).is_nan() for c in tof.columns]
    above = [(pl.col(c) > TOF_MAX_DISTANCE) & pl.col(c).cast(pl.Float32).is_finite() for c in over]
    exactly_255 = [pl.col(c) == TOF_MAX_DISTANCE + 1 for c in over]
    n_values, n_above, n_255 = tof.select(
        *(pl.sum_horizontal(flags).sum().alias(str(i)) for i, flags in enumerate((read, above, exactly_255)))
    ).row(0)
    if n_values == 0 or n_above <= TOF_ABOVE_RANGE_SHARE * n_values:
        return None
    largest = max(m for m in maxima.values() if m is not None and m < math.inf)
    return TofScaleFinding(int(n_values), int(n_above), float(largest), n_255 == n_above)

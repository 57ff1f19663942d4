"""Reading the competition CSVs with polars, with errors a user can act on.

Every reader checks that the file exists (the error names the path and the Kaggle download
command), that the expected columns are present (the error lists the missing ones), and the
label/demographics values that later code relies on.

No row is lost or misaligned silently: before polars parses a file, every line is checked to
hold as many fields as the header (a line cut by an interrupted download, or a field too many
or too few, stops the read with the file and the line number); after parsing train.csv, its id
and label columns must be filled on every row, each sequence's ``sequence_counter`` must run
0..n-1 and ``row_id`` must be ``<sequence_id>_<counter>``. A value polars cannot parse is named
with its file, column and line. A file that is no plain UTF-8 CSV (gzip, zip, UTF-16, CR-only
line endings, bytes that are not UTF-8), a header naming a column twice or with spaces around a
name, a per-sequence label that changes within a sequence and values in another unit
(``codes.common.units``) are errors too. See docs/data.md, "Malformed files".
"""

from __future__ import annotations

import csv
import logging
import mmap
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from codes.common.schema import (
    ACC_COLUMNS,
    DEMOGRAPHIC_FIELDS,
    DEMOGRAPHICS_COLUMNS,
    GESTURES,
    IMU_COLUMNS,
    KAGGLE_DOWNLOAD_COMMAND,
    LABEL_COLUMNS,
    ORIENTATIONS,
    SENSOR_COLUMNS,
    SEQUENCE_TYPE_NON_TARGET,
    SEQUENCE_TYPE_TARGET,
    TEST_COLUMNS,
    TEST_LABEL_COLUMNS,
    THM_COLUMNS,
    TOF_COLUMNS,
    TRAIN_COLUMNS,
    sequence_type_of,
)
from codes.common.units import (
    SubjectUnitFinding,
    TofScaleFinding,
    UnitFinding,
    UnusualSubjectsFinding,
    demographic_subject_unit_findings,
    demographic_unit_findings,
    merged_unit_findings,
    sensor_subject_unit_findings,
    sensor_unit_findings,
    sensor_unusual_subject_findings,
    tof_scale_finding,
)

TRAIN_FILE = "train.csv"
TEST_FILE = "test.csv"
TRAIN_DEMOGRAPHICS_FILE = "train_demographics.csv"
TEST_DEMOGRAPHICS_FILE = "test_demographics.csv"
TEST_LABELS_FILE = "test_labels.csv"  # written by the synthetic generator only

logger = logging.getLogger(__name__)

# IMU and thermopile values are read as float32 (what the models consume). ToF values are read
# as int16 when the file writes them as integers (-1..254, as the synthetic files do): parsing
# integers is much cheaper than parsing floats, and int16 holds them exactly in a quarter of the
# memory of float64; a file with decimal ToF values is read as float32. Empty fields are nulls.
_SENSOR_DTYPES = dict.fromkeys(SENSOR_COLUMNS, pl.Float32)
_INTEGER_FIELD = re.compile(rb"-?[0-9]*")  # empty = null
_SNIFFED_BYTES = 1 << 16
_DEMOGRAPHICS_DTYPES = {
    "subject": pl.String,
    "adult_child": pl.Float64,
    "age": pl.Float64,
    "sex": pl.Float64,
    "handedness": pl.Float64,
    "height_cm": pl.Float64,
    "shoulder_to_wrist_cm": pl.Float64,
    "elbow_to_wrist_cm": pl.Float64,
}

# Columns holding one value per sequence in train.csv (the table takes them from one row).
PER_SEQUENCE_COLUMNS: tuple[str, ...] = ("subject", "sequence_type", "orientation", "gesture")
_SEQUENCE_TYPE_OF_GESTURE = {g: sequence_type_of(g) for g in GESTURES}
# Columns filled on every row of the competition's files: an empty one means a damaged line.
NEVER_NULL_COLUMNS: tuple[str, ...] = ("row_id", "sequence_id", "sequence_counter", "subject", *LABEL_COLUMNS)
ROW_ID_COUNTER_DIGITS = 6  # row_id = SEQ_000007_000012
_OTHER_SEPARATORS = (";", "\t", "|")
_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = b"PK\x03\x04"
_COMMA, _NEWLINE, _QUOTE = ord(","), ord("\n"), ord('"')
_CHUNK_BYTES = 1 << 18  # bytes per step of the field-count pass (a multiple of 64; fits a cache)
_SHOWN_LINES = 5  # line numbers listed in an error
UNIT_CHECK_OVERRIDE = "+data.check_units=false"  # the train.py override of the unit check


class DataFileError(ValueError):
    """A competition file is missing or does not hold what the competition's files hold."""


class MalformedFileError(DataFileError):
    """A file cut short, misaligned or not in the competition's CSV format (names file and line)."""


def require_file(path: Path) -> Path:
    """Return ``path`` if it is a file, else raise an error that says how to get the data."""
    path = Path(path)
    if path.is_dir():
        raise DataFileError(
            f"{path} is a directory, not a file: the data folder must hold the CSV file itself; "
            f"move the file out of that folder (or remove the folder) and put {path.name} in its place"
        )
    if not path.is_file():
        raise DataFileError(
            f"missing data file: {path}\n"
            f"Download the competition data with the Kaggle CLI:\n  {KAGGLE_DOWNLOAD_COMMAND}\n"
            "or generate the synthetic stand-in: python -m codes.common.synthetic --out data/synthetic"
        )
    return path


def read_header(path: Path) -> list[str]:
    """Column names of a CSV file (reads only its first bytes; a UTF-8 byte-order mark is dropped).

    Raises :class:`MalformedFileError` for a file that is no plain UTF-8 CSV (gzip, zip, UTF-16,
    CR-only line endings: :func:`check_text_format`), an empty file, a header separated by ``;``,
    a tab or ``|`` instead of commas, a header that is not UTF-8, a column name with spaces
    around it, and a column named twice.
    """
    with open(require_file(path), "rb") as handle:
        check_text_format(path, handle.read(_SNIFFED_BYTES))
        handle.seek(0)
        first = handle.readline().rstrip(b"\r\n").removeprefix(_UTF8_BOM)
    if not first:
        raise MalformedFileError(f"{path} is empty: not even a header line; download it again")
    try:
        text = first.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _not_utf8_error(path, 1, first, error) from None
    if "," not in text:
        for separator in _OTHER_SEPARATORS:
            if separator in text:
                raise MalformedFileError(
                    f"{path} is not comma-separated: its header is separated by {separator!r} "
                    f"({text.count(separator)} times, no comma); save it as a comma-separated CSV, "
                    "as the competition's files are"
                )
    fields = text.split(",")
    names = [_unquoted(field) for field in fields]
    check_header_names(path, fields, names)
    return names


def _unquoted(field: str) -> str:
    return field[1:-1] if len(field) >= 2 and field[0] == field[-1] == '"' else field


def check_header_names(path: Path, fields: Sequence[str], names: Sequence[str]) -> None:
    """Raise for a header field with spaces around the name, or a name given twice.

    Either would make polars read another column than the one named: a padded name is not
    found, and of two columns of the same name only the first is read.
    """
    padded = [
        (i, f) for i, (f, n) in enumerate(zip(fields, names, strict=True)) if f != f.strip() or n != n.strip()
    ]
    if padded:
        shown = ", ".join(f"column {i + 1} {f!r}" for i, f in padded[:_SHOWN_LINES])
        more = f", ... ({len(padded)} in all)" if len(padded) > _SHOWN_LINES else ""
        raise MalformedFileError(
            f"{path}: header names with spaces around them: {shown}{more}; the columns would not be "
            f"found. Remove the spaces from the header line (e.g. {_unquoted(padded[0][1].strip()).strip()!r})"
        )
    positions: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        positions.setdefault(name, []).append(i + 1)
    duplicated = {n: p for n, p in positions.items() if len(p) > 1}
    if duplicated:
        shown = "; ".join(
            f"{n!r} at columns {', '.join(map(str, p))}" for n, p in list(duplicated.items())[:_SHOWN_LINES]
        )
        raise MalformedFileError(
            f"{path}: the header names a column more than once ({shown}); only one of them would be "
            "read. Remove or rename the extra column(s), so that each name appears once"
        )


def check_text_format(path: Path, head: bytes) -> None:
    """Raise :class:`MalformedFileError` when the first bytes ``head`` of ``path`` show a gzip or
    zip archive, UTF-16 text (a byte-order mark or NUL bytes) or CR-only line endings."""
    if head.startswith(_GZIP_MAGIC):
        raise MalformedFileError(
            f"{path} is gzip-compressed, not a plain CSV: decompress it "
            f"(gunzip -c {path} > {path.name}.plain, then put that file in its place)"
        )
    if head.startswith(_ZIP_MAGIC):
        raise MalformedFileError(
            f"{path} is a zip archive, not a plain CSV: unzip it (unzip {path} -d <folder>) and put the "
            f"CSV it holds in its place"
        )
    if head.startswith(_UTF16_BOMS) or b"\x00" in head:
        what = "starts with a UTF-16 byte-order mark" if head.startswith(_UTF16_BOMS) else "holds NUL bytes"
        raise MalformedFileError(
            f"{path} {what}: it is UTF-16 (or binary) text, not UTF-8; save it as UTF-8 "
            f"(e.g. iconv -f UTF-16 -t UTF-8 {path} > {path.name}.utf8, then put that file in its place)"
        )
    if b"\r" in head and b"\n" not in head:
        raise MalformedFileError(
            f"{path} has CR-only line endings (old Mac style): every line would run together. Convert "
            f"the line endings to newlines (e.g. tr '\\r' '\\n' < {path} > {path.name}.unix, then put that "
            "file in its place)"
        )


def _not_utf8_error(path: Path, line: int, text: bytes, error: UnicodeDecodeError) -> MalformedFileError:
    bad = text[error.start : error.end + 8]
    return MalformedFileError(
        f"{path}, line {line}: bytes that are not UTF-8 ({bad!r} at byte {error.start + 1} of the line); "
        "the competition's files are UTF-8. Download the file again, or convert it from the encoding "
        f"it was saved in (e.g. iconv -f latin1 -t utf-8 {path} > {path.name}.utf8)"
    )


def not_utf8_error(path: Path) -> MalformedFileError | None:
    """The first line of ``path`` that is not UTF-8, as an error naming it (None: every line is).

    Only for the error path: it scans the bytes >= 0x80 of the whole file.
    """
    with open(path, "rb") as handle:
        if Path(path).stat().st_size == 0:
            return None
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    data = np.frombuffer(mapped, dtype=np.uint8)
    checked_until = 0
    for position in np.flatnonzero(data >= 0x80):
        if position < checked_until:
            continue
        start = mapped.rfind(b"\n", 0, int(position)) + 1
        end = mapped.find(b"\n", int(position))
        end = len(mapped) if end < 0 else end
        text = mapped[start:end]
        try:
            text.decode("utf-8")
        except UnicodeDecodeError as error:
            line = int(np.count_nonzero(data[:start] == _NEWLINE)) + 1
            return _not_utf8_error(path, line, text, error)
        checked_until = end
    return None


def _is_not_utf8(error: Exception) -> bool:
    return "utf-8" in str(error).lower() or isinstance(error, UnicodeDecodeError)


def check_columns(path: Path, present: Sequence[str], required: Sequence[str]) -> None:
    """Raise a :class:`DataFileError` listing every required column missing from ``present``."""
    present_set = set(present)
    missing = [c for c in required if c not in present_set]
    if missing:
        shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise DataFileError(f"{path} lacks required columns: {shown}")


# ---------------------------------------------------------------- field counts per line
@dataclass(frozen=True)
class CsvLayout:
    """What :func:`check_field_counts` learned about a file: its data rows and their lines."""

    n_rows: int
    # file line (1-based) of each data row when a quoted field spans lines; None: row i is on line i + 2
    row_lines: np.ndarray | None = None
    trailing_empty_lines: int = 0  # empty lines after the last row: accepted, not read

    @property
    def rows_to_read(self) -> int | None:
        """``n_rows`` for ``pl.read_csv`` when empty lines end the file (polars would read them as
        rows of nulls); None (the whole file) otherwise."""
        return self.n_rows if self.trailing_empty_lines else None

    def line(self, row: int) -> int:
        return int(row) + 2 if self.row_lines is None else int(self.row_lines[row])

    def lines(self, rows: Sequence[int] | np.ndarray) -> str:
        """``rows`` as "line 12", "lines 12 and 40" or "lines 12, 40, ... (7 in all)"."""
        shown = [str(self.line(r)) for r in list(rows)[:_SHOWN_LINES]]
        if len(rows) == 1:
            return f"line {shown[0]}"
        if len(rows) <= _SHOWN_LINES:
            return "lines " + ", ".join(shown[:-1]) + " and " + shown[-1]
        return "lines " + ", ".join(shown) + f", ... ({len(rows)} in all)"


def _popcount(words: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(words)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[words.view(np.uint8)].reshape(len(words), 8).sum(axis=1, dtype=np.uint8)


def _commas_before_newlines(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, int] | None:
    """The position of every newline byte of ``data``, the commas before each, and all commas;
    None when ``data`` holds a quote (a quoted field may hold commas and newlines).

    Vectorised per 256 KiB step: the comma flags are packed into 64-bit words (bit i of word
    j: byte 64 j + i), whose population counts give the commas before any position.
    """
    newline_parts, before_parts, total = [], [], 0
    for start in range(0, len(data), _CHUNK_BYTES):
        chunk = data[start : start + _CHUNK_BYTES]
        if (chunk == _QUOTE).any():
            return None
        bits = np.packbits(chunk == _COMMA, bitorder="little")
        commas = (bits if len(bits) % 8 == 0 else np.pad(bits, (0, -len(bits) % 8))).view("<u8")
        before_word = np.zeros(len(commas) + 1, dtype=np.int64)
        np.cumsum(_popcount(commas), out=before_word[1:])
        newlines = np.flatnonzero(chunk == _NEWLINE)
        word = newlines >> 6
        below = (np.uint64(1) << (newlines & 63).astype(np.uint64)) - np.uint64(1)
        before_parts.append(total + before_word[word] + _popcount(commas[word] & below))
        newline_parts.append(start + newlines)
        total += int(before_word[-1])
    return np.concatenate(newline_parts), np.concatenate(before_parts), total


def _line_text(data: bytes | np.ndarray, start: int, end: int) -> str:
    text = bytes(data[start : min(end, start + 80)]).decode("utf-8", "replace").rstrip("\r\n")
    return text + (" ..." if end - start > 80 else "")


def _ragged_line_error(
    path: Path, line: int, n_found: int, n_fields: int, text: str, also: str
) -> MalformedFileError:
    if not text.strip():
        return MalformedFileError(
            f"{path}, line {line} is empty, between rows of data{also}: delete the empty line(s) (empty "
            "lines are accepted only at the very end of a file), or download the file again"
        )
    what = f"has {n_found} field(s) where the header has {n_fields}"
    other = [s for s in _OTHER_SEPARATORS if s in text]
    if n_found == 1 and other:
        what += f" (it is separated by {other[0]!r}, not by commas)"
    return MalformedFileError(
        f"{path}, line {line} {what}: its values would land in the wrong columns{also}. "
        f"The line starts: {text!r}"
    )


def _cut_short_error(path: Path, line: int, n_found: int, n_fields: int) -> MalformedFileError:
    return MalformedFileError(
        f"{path} is cut short: its last line (line {line}) has {n_found} of {n_fields} fields and "
        "no final newline: the file looks truncated (an interrupted download or copy?); download it again"
    )


def check_field_counts(path: Path, n_fields: int) -> CsvLayout:
    """Check that every line of ``path`` has ``n_fields`` comma-separated fields.

    A line with a field too many or too few, an empty line, or a short last line without a
    final newline (a file cut short) raises :class:`MalformedFileError` naming the line. A full
    last line without a final newline only logs a warning (its last value may be cut). Files
    with quoted fields are checked with the ``csv`` module (slower); the others by counting the
    commas of each line in one vectorised pass over the bytes.
    """
    if Path(path).stat().st_size == 0:
        return CsvLayout(n_rows=0)
    with open(path, "rb") as handle:  # the map outlives the handle; it closes with its last view
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    data = np.frombuffer(mapped, dtype=np.uint8)
    counted = _commas_before_newlines(data)
    if counted is None:
        return _check_quoted_field_counts(path, n_fields)
    newlines, before, total = counted
    per_line = np.diff(before, prepend=0)  # line k (0 = the header) ends at newlines[k]
    expected = n_fields - 1
    bad = np.flatnonzero(per_line[1:] != expected) + 1
    tail_start = int(newlines[-1]) + 1 if len(newlines) else 0
    has_tail = tail_start < len(data)  # a last line without a final newline
    n_lines = len(newlines) + has_tail  # the header included
    tail_commas = total - (int(before[-1]) if len(before) else 0)
    n_trailing = 0 if has_tail else _trailing_empty_lines(data, newlines, bad)
    bad, n_lines = bad[: len(bad) - n_trailing], n_lines - n_trailing
    if len(bad):
        line = int(bad[0])
        start = int(newlines[line - 1]) + 1
        also = f" (also lines {', '.join(str(b + 1) for b in bad[1:_SHOWN_LINES])}" if len(bad) > 1 else ""
        if also:
            also += f", ... ({len(bad)} lines in all))" if len(bad) > _SHOWN_LINES else ")"
        raise _ragged_line_error(
            path,
            line + 1,
            int(per_line[line]) + 1,
            n_fields,
            _line_text(data, start, int(newlines[line])),
            also,
        )
    if has_tail and tail_commas < expected:
        raise _cut_short_error(path, n_lines, tail_commas + 1, n_fields)
    if has_tail and tail_commas > expected:
        text = _line_text(data, tail_start, len(data))
        raise _ragged_line_error(path, n_lines, tail_commas + 1, n_fields, text, "")
    if has_tail:
        logger.warning("%s does not end with a newline: the last value of line %d may be cut", path, n_lines)
    _log_trailing_empty_lines(path, n_trailing)
    return CsvLayout(n_rows=max(n_lines - 1, 0), trailing_empty_lines=n_trailing)


def _trailing_empty_lines(data: np.ndarray, newlines: np.ndarray, bad: np.ndarray) -> int:
    """How many of the lines ending at ``newlines`` (line k ends at ``newlines[k]``; 0: the
    header) are empty (nothing, or a lone CR) at the end of the file; ``bad``: the lines with
    another field count, where every empty line is."""
    count = 0
    for line in bad[::-1]:
        start = int(newlines[line - 1]) + 1
        text = bytes(data[start : int(newlines[line])])
        if line != len(newlines) - 1 - count or text not in (b"", b"\r"):
            break
        count += 1
    return count


def _log_trailing_empty_lines(path: Path, n_trailing: int) -> None:
    if n_trailing:
        logger.info("%s ends with %d empty line(s): not read (they hold no row)", path, n_trailing)


def _check_quoted_field_counts(path: Path, n_fields: int) -> CsvLayout:
    """:func:`check_field_counts` for a file with quoted fields (which may hold commas or newlines)."""
    logger.info("%s has quoted fields: checking its field counts with the csv module", path)
    with open(path, "rb") as handle:
        handle.seek(-1, 2)
        ends_with_newline = handle.read(1) == b"\n"
    row_lines, empty_lines = [], []
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, strict=True)
        try:
            next(reader)  # the header
            line = reader.line_num + 1
            for record in reader:
                if not record:  # an empty line: accepted at the end of the file only
                    empty_lines.append(line)
                    line = reader.line_num + 1
                    continue
                if empty_lines:
                    raise _ragged_line_error(path, empty_lines[0], 0, n_fields, "", "")
                if len(record) != n_fields:
                    last = not ends_with_newline and not handle.read(1)
                    if last and len(record) < n_fields:
                        raise _cut_short_error(path, line, len(record), n_fields)
                    raise _ragged_line_error(path, line, len(record), n_fields, ",".join(record)[:80], "")
                row_lines.append(line)
                line = reader.line_num + 1
        except csv.Error as error:
            raise MalformedFileError(
                f"{path}, line {reader.line_num}: {error} (a quoted field is not closed?)"
            ) from error
        except UnicodeDecodeError as error:
            raise (not_utf8_error(path) or MalformedFileError(f"{path}: {error}")) from None
    _log_trailing_empty_lines(path, len(empty_lines))
    return CsvLayout(
        n_rows=len(row_lines),
        row_lines=np.asarray(row_lines, dtype=np.int64),
        trailing_empty_lines=len(empty_lines),
    )


# ---------------------------------------------------------------- parsing and row checks
def _unparsable_value_error(
    path: Path, error: Exception, dtypes: dict[str, pl.DataType], layout: CsvLayout
) -> MalformedFileError:
    """The first value polars could not parse: its column, line and text (or the first line
    that is not UTF-8)."""
    message = str(error)
    if _is_not_utf8(error) and (not_utf8 := not_utf8_error(path)) is not None:
        return not_utf8
    named = re.search(r"at column '([^']*)'", message)
    if named and named.group(1) in dtypes:
        candidates = [named.group(1)]
    else:
        candidates = [c for c, t in dtypes.items() if t.is_numeric()]
    if candidates:
        raw = pl.read_csv(
            path,
            columns=candidates,
            schema_overrides=dict.fromkeys(candidates, pl.String),
            n_rows=layout.rows_to_read,
        )
        for column in candidates:
            values = raw[column]
            unparsable = (
                values.cast(dtypes[column], strict=False).is_null() & values.is_not_null()
            ).arg_true()
            if len(unparsable):
                kind = "an integer" if dtypes[column].is_integer() else "a number"
                row = int(unparsable[0])
                more = f" ({len(unparsable)} such values in this column)" if len(unparsable) > 1 else ""
                return MalformedFileError(
                    f"{path}, line {layout.line(row)}, column {column}: {values[row]!r} is not {kind}{more}"
                )
    return MalformedFileError(f"{path} could not be parsed: {message.splitlines()[0]}")


def _parse_csv(
    path: Path, columns: Sequence[str], dtypes: dict[str, pl.DataType], layout: CsvLayout
) -> pl.DataFrame:
    """``pl.read_csv`` of checked lines; a value that does not parse is named (file, column, line)."""
    try:
        frame = pl.read_csv(path, columns=list(columns), schema_overrides=dtypes, n_rows=layout.rows_to_read)
    except pl.exceptions.ComputeError as error:
        raise _unparsable_value_error(path, error, dtypes, layout) from error
    _check_row_count(frame, path, layout)
    return frame


def _check_row_count(frame: pl.DataFrame, path: Path, layout: CsvLayout) -> None:
    if frame.height != layout.n_rows:  # both count the same lines: a mismatch is a bug, not bad data
        raise MalformedFileError(
            f"{path}: polars read {frame.height} rows where the file has {layout.n_rows}"
        )


def check_rows(frame: pl.DataFrame, path: Path | str, layout: CsvLayout) -> None:
    """The row checks of a parsed file (each applies when its columns are in ``frame``).

    Columns of :data:`NEVER_NULL_COLUMNS` have a value on every row; the ``sequence_counter``
    values of each sequence are exactly 0..n-1 (rows may come in any order); ``row_id`` is
    ``<sequence_id>_<sequence_counter>``; the columns of :data:`PER_SEQUENCE_COLUMNS` hold one
    value per sequence, and ``sequence_type`` is the one its ``gesture`` has.
    """
    check_not_null(frame, path, layout)
    if {"sequence_id", "sequence_counter"} <= set(frame.columns):
        check_sequence_counters(frame, path, layout)
    if {"row_id", "sequence_id", "sequence_counter"} <= set(frame.columns):
        check_row_ids(frame, path, layout)
    if "sequence_id" in frame.columns:
        check_per_sequence_fields(frame, path, layout)
    if {"sequence_id", "sequence_type", "gesture"} <= set(frame.columns):
        check_sequence_types(frame, path, layout)


def check_not_null(frame: pl.DataFrame, path: Path | str, layout: CsvLayout) -> None:
    """Raise naming the lines where a column of :data:`NEVER_NULL_COLUMNS` is empty."""
    columns = [c for c in NEVER_NULL_COLUMNS if c in frame.columns]
    counts = frame.select(pl.col(columns).null_count()).row(0) if columns else ()
    for column, count in zip(columns, counts, strict=True):
        if count:
            rows = frame[column].is_null().arg_true().to_numpy()
            raise MalformedFileError(
                f"{path}: column {column} is empty on {layout.lines(rows)}; every row of the "
                "competition's files has it (a damaged line, or values shifted between columns?)"
            )


def check_sequence_counters(frame: pl.DataFrame, path: Path | str, layout: CsvLayout) -> None:
    """Raise unless the ``sequence_counter`` values of every sequence are exactly 0..n-1."""
    ids, counter = pl.col("sequence_id"), pl.col("sequence_counter")
    starts = (ids != ids.shift(1)).fill_null(True)
    in_file_order = frame.select(
        pl.when(starts).then(counter == 0).otherwise(counter.diff() == 1).all(),
        starts.sum() == ids.n_unique(),
    ).row(0)
    if all(in_file_order):  # the usual layout: each sequence in one run, counting 0, 1, 2, ...
        return
    broken = (
        frame.group_by("sequence_id", maintain_order=True)
        .agg(n=pl.len(), low=counter.min(), high=counter.max(), distinct=counter.n_unique())
        .filter(
            (pl.col("low") != 0) | (pl.col("high") != pl.col("n") - 1) | (pl.col("distinct") != pl.col("n"))
        )
    )
    if broken.is_empty():
        return  # complete sequences in another row order: sorted when the table is built
    sequence = broken["sequence_id"][0]
    rows = (
        frame.select(counter)
        .with_row_index("row")
        .filter(frame["sequence_id"] == sequence)
        .sort("sequence_counter")
    )
    values, row_of = rows["sequence_counter"].to_numpy(), rows["row"].to_numpy()
    k = int(np.flatnonzero(values != np.arange(len(values)))[0])
    if values[k] > k:
        problem = (
            f"line {layout.line(row_of[k])}: sequence {sequence} has no row with sequence_counter {k} "
            f"(the next counter is {values[k]}): rows are missing"
        )
    elif k == 0:
        problem = (
            f"line {layout.line(row_of[0])}: sequence {sequence} has a negative sequence_counter {values[0]}"
        )
    else:
        problem = (
            f"{layout.lines(sorted(row_of[k - 1 : k + 1]))}: sequence {sequence} has sequence_counter "
            f"{values[k]} twice"
        )
    others = f" ({broken.height} sequences break it, e.g. {broken['sequence_id'].head(5).to_list()})"
    raise MalformedFileError(
        f"{path}, {problem}; each sequence's counters must run 0..n-1{others if broken.height > 1 else ''}"
    )


def check_row_ids(frame: pl.DataFrame, path: Path | str, layout: CsvLayout) -> None:
    """Raise unless every ``row_id`` is ``<sequence_id>_<sequence_counter>`` (6-digit counter)."""
    counter = pl.col("sequence_counter")
    padded = pl.col("sequence_id") + "_" + counter.cast(pl.String).str.zfill(ROW_ID_COUNTER_DIGITS)
    mismatched = frame.select((pl.col("row_id") != padded).arg_true()).to_series()
    if mismatched.is_empty():
        return
    # the counter written with another number of digits is still the same row
    suspects = frame.select("row_id", "sequence_id", "sequence_counter")[mismatched]
    prefix = pl.col("sequence_id") + "_"
    suffix = pl.col("row_id").str.slice(pl.col("sequence_id").str.len_chars() + 1)
    same = pl.col("row_id").str.starts_with(prefix) & (suffix.cast(pl.Int64, strict=False) == counter)
    wrong = suspects.select(~same.fill_null(False)).to_series().arg_true()
    if wrong.is_empty():
        return
    rows = mismatched.gather(wrong).to_numpy()
    row_id, sequence_id, value = frame.select("row_id", "sequence_id", "sequence_counter").row(int(rows[0]))
    raise MalformedFileError(
        f"{path}, {layout.lines(rows)}: row_id {row_id!r} does not match sequence_id {sequence_id!r} "
        f"and sequence_counter {value} (expected '{sequence_id}_{value:0{ROW_ID_COUNTER_DIGITS}d}'): values shifted between columns?"
    )


def check_per_sequence_fields(frame: pl.DataFrame, path: Path | str, layout: CsvLayout) -> None:
    """Raise unless each column of :data:`PER_SEQUENCE_COLUMNS` in ``frame`` holds one value per
    sequence (the table takes a sequence's labels from one row: a second value would be lost)."""
    columns = [c for c in PER_SEQUENCE_COLUMNS if c in frame.columns]
    if not columns:
        return
    ids = pl.col("sequence_id")
    same_sequence = ids == ids.shift(1)
    changed = pl.any_horizontal([pl.col(c) != pl.col(c).shift(1) for c in columns])
    contiguous, changes = frame.select(
        ((~same_sequence).fill_null(True).sum() == ids.n_unique()).alias("contiguous"),
        (same_sequence & changed).any().alias("changed"),
    ).row(0)
    if contiguous and not changes:  # the usual layout: one value per run of a sequence's rows
        return
    differs = frame.select(
        pl.any_horizontal([pl.col(c) != pl.col(c).first().over("sequence_id") for c in columns]).arg_true()
    ).to_series()
    if differs.is_empty():
        return
    broken = frame["sequence_id"].gather(differs)
    sequence = broken[0]
    of_sequence = frame.with_row_index("row").filter(pl.col("sequence_id") == sequence)
    column = next(c for c in columns if of_sequence[c].n_unique() > 1)
    values = of_sequence[column]
    odd_rows = of_sequence["row"].filter(values != values[0]).to_list()
    rows = [int(of_sequence["row"][0]), *odd_rows]
    distinct = values.unique(maintain_order=True).to_list()
    n_broken = broken.n_unique()
    others = f" ({n_broken} sequences have such rows)" if n_broken > 1 else ""
    raise MalformedFileError(
        f"{path}, {layout.lines(rows)}: sequence {sequence} holds {len(distinct)} different {column} values "
        f"({', '.join(map(repr, distinct[:_SHOWN_LINES]))}); every row of a sequence has the same "
        f"{', '.join(PER_SEQUENCE_COLUMNS)}{others}. Rows of two sequences mixed up, or values shifted "
        "between columns? Fix those lines or download the file again"
    )


def check_sequence_types(frame: pl.DataFrame, path: Path | str, layout: CsvLayout) -> None:
    """Raise unless ``sequence_type`` is ``Target`` for the 8 target gestures and ``Non-Target``
    for the other 10 (an unknown gesture is left to :func:`check_gestures`)."""
    expected = pl.col("gesture").replace_strict(
        _SEQUENCE_TYPE_OF_GESTURE, default=None, return_dtype=pl.String
    )
    wrong = frame.select(
        (expected.is_not_null() & (pl.col("sequence_type") != expected)).arg_true()
    ).to_series()
    if wrong.is_empty():
        return
    sequence, sequence_type, gesture = frame.select("sequence_id", "sequence_type", "gesture").row(
        int(wrong[0])
    )
    rows = wrong.filter(frame["sequence_id"].gather(wrong) == sequence).to_numpy()
    n_broken = frame["sequence_id"].gather(wrong).n_unique()
    others = f" ({n_broken} sequences in all)" if n_broken > 1 else ""
    raise MalformedFileError(
        f"{path}, {layout.lines(rows)}: sequence {sequence} has sequence_type {sequence_type!r} but gesture "
        f"{gesture!r}, whose sequence_type is {sequence_type_of(gesture)!r}{others}. sequence_type follows "
        f"from the gesture ({SEQUENCE_TYPE_TARGET!r} for the 8 target gestures, {SEQUENCE_TYPE_NON_TARGET!r} "
        "for the others): a label shifted between columns? Fix those lines or download the file again"
    )


def integer_tof_fields(path: Path, header: Sequence[str]) -> bool:
    """Whether the ToF fields of the first lines of ``path`` are written as integers (or empty)."""
    positions = [i for i, name in enumerate(header) if name.startswith("tof_")]
    with open(path, "rb") as handle:
        lines = handle.read(_SNIFFED_BYTES).split(b"\n")[1:-1]  # whole data lines only
    if not positions or not lines:
        return False
    for line in lines:
        if line in (b"", b"\r"):  # an empty line at the end (any other is an error)
            continue
        fields = line.rstrip(b"\r").split(b",")
        if len(fields) != len(header) or not all(_INTEGER_FIELD.fullmatch(fields[i]) for i in positions):
            return False
    return True


def open_csv(path: Path, required: Sequence[str]) -> tuple[list[str], CsvLayout]:
    """The header and line layout of a CSV after the file, column and field-count checks."""
    path = require_file(path)
    header = read_header(path)
    check_columns(path, header, required)
    return header, check_field_counts(path, len(header))


def read_sensor_csv(
    path: Path,
    required: Sequence[str],
    columns: Sequence[str] | None = None,
    check_values: bool = True,
) -> pl.DataFrame:
    """Read ``columns`` (default: ``required``) of a train/test CSV after checking the header.

    Sensor columns are float32, except ToF columns written as integers: int16 (see
    ``integer_tof_fields``; if a later line holds a decimal or out-of-range ToF value, the file
    is read again with float32 ToF). Every line is checked first (:func:`check_field_counts`);
    a file without data rows is an error. With ``check_values`` the rows are checked too
    (:func:`check_rows`; the id and label columns of ``required`` are read for it even when
    ``columns`` leaves them out).
    """
    path = require_file(path)
    header = read_header(path)
    check_columns(path, header, required)
    wanted = list(columns if columns is not None else required)
    checked = [c for c in NEVER_NULL_COLUMNS if check_values and c in required and c not in wanted]
    to_read = wanted + checked
    dtypes = {c: t for c, t in _SENSOR_DTYPES.items() if c in to_read}
    dtypes["sequence_counter"] = pl.Int32
    dtypes.update(
        {c: pl.String for c in ("row_id", "sequence_id", "subject", *LABEL_COLUMNS) if c in to_read}
    )
    layout = check_field_counts(path, len(header))
    if layout.n_rows == 0:
        raise MalformedFileError(f"{path} holds no data rows, only its header line; download it again")
    try:
        frame = _read_sensor_values(path, header, to_read, dtypes, layout.rows_to_read)
    except pl.exceptions.ComputeError as error:
        raise _unparsable_value_error(path, error, dtypes, layout) from error
    _check_row_count(frame, path, layout)
    if check_values:
        check_rows(frame, path, layout)
    return frame.select(wanted)


def _read_sensor_values(
    path: Path,
    header: Sequence[str],
    columns: list[str],
    dtypes: dict[str, pl.DataType],
    n_rows: int | None = None,
) -> pl.DataFrame:
    """``pl.read_csv`` (of the first ``n_rows`` rows, default all) with int16 ToF when the file
    writes ToF as integers, else float32 ToF."""
    tof = [c for c in columns if c.startswith("tof_")]
    if tof and integer_tof_fields(path, header):
        try:
            return pl.read_csv(
                path, columns=columns, schema_overrides=dtypes | dict.fromkeys(tof, pl.Int16), n_rows=n_rows
            )
        except pl.exceptions.ComputeError as error:
            if _is_not_utf8(error):
                raise
            logger.info(
                "%s: ToF values are not all int16 (%s); reading them as float32", path, str(error)[:200]
            )
    return pl.read_csv(path, columns=columns, schema_overrides=dtypes, n_rows=n_rows)


def sensor_columns_to_read(include_thm: bool = True, include_tof: bool = True) -> list[str]:
    """The sensor columns a feature configuration needs (skipping ToF saves most of the read)."""
    return IMU_COLUMNS + (THM_COLUMNS if include_thm else []) + (TOF_COLUMNS if include_tof else [])


def _meta_columns_to_read(
    columns: Sequence[str], wanted: Sequence[str] | None, always: Sequence[str] = ()
) -> list[str]:
    """The non-sensor columns of a file to read: all of them, or those ``wanted`` plus ``always``."""
    meta = [c for c in columns if c not in SENSOR_COLUMNS]
    return meta if wanted is None else [c for c in meta if c in wanted or c in always]


def read_train(
    data_dir: Path,
    include_thm: bool = True,
    include_tof: bool = True,
    meta_columns: Sequence[str] | None = None,
    check_units: bool = True,
) -> pl.DataFrame:
    """train.csv: metadata and labels plus the sensor columns asked for; gestures are checked.

    ``meta_columns`` narrows the non-sensor columns read (default: all; gesture is always read).
    Values that look recorded in another unit (``codes.common.units``: acceleration in g, ...)
    raise a :class:`DataFileError` naming the unit and the conversion; ``check_units=False``
    turns it into a warning (the values are used as they are).
    """
    path = Path(data_dir) / TRAIN_FILE
    meta = _meta_columns_to_read(TRAIN_COLUMNS, meta_columns, always=("gesture",))
    frame = read_sensor_csv(path, TRAIN_COLUMNS, meta + sensor_columns_to_read(include_thm, include_tof))
    check_gestures(frame["gesture"], path)
    if "orientation" in frame.columns:
        check_orientations(frame["orientation"], path)
    enforce_units(frame_unit_findings(frame), path, stop=check_units)
    return frame


AnyUnitFinding = UnitFinding | SubjectUnitFinding | UnusualSubjectsFinding | TofScaleFinding


def frame_unit_findings(frame: pl.DataFrame) -> list[AnyUnitFinding]:
    """The unit findings (``codes.common.units``) of a frame's acc and thermopile columns, over
    the file and per subject when the frame has ``subject`` (``units.merged_unit_findings``),
    and of its ToF columns."""
    columns = [c for c in (*ACC_COLUMNS, *THM_COLUMNS) if c in frame.columns]
    values = frame.select(columns).to_numpy()
    findings: list[AnyUnitFinding] = list(sensor_unit_findings(values, columns))
    if "subject" in frame.columns:
        by_subject = frame.select("subject", *columns)
        flagged_file = {finding.rule for finding in findings}  # the file's own message covers its subjects
        findings = merged_unit_findings(findings, sensor_subject_unit_findings(by_subject)) + [
            finding
            for finding in sensor_unusual_subject_findings(by_subject)
            if finding.rule not in flagged_file
        ]
    tof = tof_scale_finding(frame.select(c for c in TOF_COLUMNS if c in frame.columns))
    return findings + ([tof] if tof is not None else [])


def enforce_units(findings: Sequence[AnyUnitFinding], source: Path | str, stop: bool) -> None:
    """Raise :class:`DataFileError` for the first finding that names a likely unit when ``stop``;
    log every finding as a warning otherwise (and those that name no unit, always)."""
    for finding in findings:
        if stop and finding.likely:
            raise DataFileError(
                f"{source}: {finding.message()}. If the values are right as they are, train with "
                f"{UNIT_CHECK_OVERRIDE} on the train.py command line (load_sequence_table(..., "
                "check_units=False)) to use them with a warning"
            )
    for finding in findings:
        logger.warning("%s: %s", source, finding.message())


def read_test(
    data_dir: Path,
    include_thm: bool = True,
    include_tof: bool = True,
    meta_columns: Sequence[str] | None = None,
) -> pl.DataFrame:
    """test.csv with the sensor columns asked for (``meta_columns`` as in :func:`read_train`).

    Its lines are checked as train.csv's (a file cut short or misaligned is an error), its id
    values are not: batch mode answers every sequence by ``predict()``'s rules, odd ids included.
    Values that look recorded in another unit are warned about, as ``predict()`` does.
    """
    path = Path(data_dir) / TEST_FILE
    meta = _meta_columns_to_read(TEST_COLUMNS, meta_columns)
    columns = meta + sensor_columns_to_read(include_thm, include_tof)
    frame = read_sensor_csv(path, TEST_COLUMNS, columns, check_values=False)
    enforce_units(frame_unit_findings(frame), path, stop=False)
    return frame


def check_gestures(gestures: pl.Series, path: Path | str) -> None:
    """Raise naming every gesture string that is not one of the 18 competition gestures."""
    unknown = sorted(set(gestures.drop_nulls().unique().to_list()) - set(GESTURES))
    if gestures.null_count():
        unknown = ["<empty>", *unknown]
    if unknown:
        raise DataFileError(
            f"{path} holds gesture strings outside the 18 competition gestures: {unknown}; "
            f"known gestures: {GESTURES}"
        )


def read_demographics(path: Path, check_units: bool = False) -> pl.DataFrame:
    """A demographics CSV (one row per subject); numeric fields as float64, nulls kept.

    Lines are checked as in :func:`read_sensor_csv`; every row names its subject. Lengths that
    look recorded in another unit (height in metres, ...; ``codes.common.units``) are warned
    about, or raise a :class:`DataFileError` with ``check_units`` (training's files).
    """
    path = Path(path)
    _, layout = open_csv(path, DEMOGRAPHICS_COLUMNS)
    frame = _parse_csv(path, DEMOGRAPHICS_COLUMNS, _DEMOGRAPHICS_DTYPES, layout)
    check_not_null(frame, path, layout)
    duplicated = frame.filter(pl.col("subject").is_duplicated())["subject"].unique().sort().to_list()
    if duplicated:
        raise DataFileError(f"{path} lists these subjects more than once: {duplicated}")
    values = frame.select(DEMOGRAPHIC_FIELDS).to_numpy().astype(np.float64)
    findings = merged_unit_findings(
        demographic_unit_findings(values), demographic_subject_unit_findings(frame)
    )
    enforce_units(findings, path, stop=check_units)
    return frame


def check_orientations(orientations: pl.Series, path: Path | str) -> None:
    """Raise naming every orientation string that is not one of the competition's 4 (a trailing
    space or another case would leave the orientation unknown to every model that uses it)."""
    unknown = sorted(set(orientations.drop_nulls().unique().to_list()) - set(ORIENTATIONS))
    if unknown:
        raise DataFileError(
            f"{path} holds orientation strings outside the competition's {len(ORIENTATIONS)} orientations: "
            f"{unknown}; known orientations: {ORIENTATIONS}. Write them exactly so (spaces and case "
            "included)"
        )


def check_demographics_cover(subjects: pl.Series, demographics: pl.DataFrame, path: Path | str) -> None:
    """Raise naming every subject of the sensor file that has no demographics row (with a hint
    when some of them match a row once spaces around the ids are stripped)."""
    listed = demographics["subject"].drop_nulls().to_list()
    missing = sorted(set(subjects.unique().to_list()) - set(listed))
    if missing:
        padded = {s.strip(): s for s in listed if s != s.strip()}
        near = [s for s in missing if s.strip() in padded]
        hint = (
            f". {len(near)} of them match a row once spaces around the subject ids are stripped "
            f"(e.g. {padded[near[0].strip()]!r} for {near[0]!r}): remove the spaces around the subject "
            f"ids in {path}"
            if near
            else ""
        )
        raise DataFileError(
            f"{len(missing)} subject(s) have no row in {path}: {missing[:10]}"
            + (" ..." if len(missing) > 10 else "")
            + hint
        )


def read_test_labels(data_dir: Path) -> pl.DataFrame | None:
    """The synthetic data's test labels (sequence_id -> gesture), or None for the real data."""
    path = Path(data_dir) / TEST_LABELS_FILE
    if not path.is_file():
        return None
    _, layout = open_csv(path, TEST_LABEL_COLUMNS)
    frame = _parse_csv(path, TEST_LABEL_COLUMNS, dict.fromkeys(TEST_LABEL_COLUMNS, pl.String), layout)
    check_not_null(frame, path, layout)
    check_gestures(frame["gesture"], path)
    return frame

"""Anomaly scores for a whole file of records, images or texts: `genserve score INPUT --model NAME --out OUTPUT`.

The input is read as a stream, a chunk of rows at a time, so files of any size work; each chunk is scored by a
running server (POST /v1/models/{name}/anomaly through `service.client`) or in this process
(`service.local.LocalScorer`, `--local`), and appended to OUTPUT before the next chunk is read.

Input (INPUT's extension picks the format: .csv, or .jsonl/.ndjson/.json):
  records  CSV with a header: the model's feature names select and order the columns (other columns are
           ignored; a missing one is an error before anything is scored). JSONL: per line an object with the
           feature names as keys, {"record": [numbers]}, or a bare list of numbers.
  images   JSONL: {"image": rows of integer levels or a base64 PNG string, "label": optional class}.
  texts    JSONL {"text": "..."} (or a bare JSON string), or CSV with a `text` column.
A JSONL row is one physical line; a CSV row may span lines (quoted line breaks).

Output (OUTPUT's extension, or --format: csv or jsonl): exactly one row per input row, in input order, with
  line            the input row's first physical line, 1-based (in a CSV input the header is line 1)
  id              the --id-column value, if asked for (in CSV output line breaks in it become spaces)
  score, percentile, is_anomaly, log_prob, threshold
  component, responsibility   GMMs: the most responsible mixture component and its posterior
  error           why the row could not be scored ("line 17: 29 values, the model expects 30 features
                  (...)"), with the score fields empty; empty for scored rows.
Blank lines are rows too: they are reported as bad rows ("empty line"), so the output's `line` column
accounts for every line of a JSONL input. Rows are validated here first (JSON, numbers, feature counts,
finite values, image shapes and levels); a chunk the model still refuses with a 4xx is split in halves
until only the refused rows are left, and those get the model's message as their error. 5xx and connection
errors are retried with backoff, then the run stops, keeping what it wrote.

Resume rule: OUTPUT is appended a chunk at a time and fsync'ed after each. Running the same command again
after an interruption first cuts a partial last line from OUTPUT, then continues after the last input line
OUTPUT holds (a CSV output keeps its single header). The settings of the run (model name and version, score
type, threshold or false-positive rate, id column, input path, format and size, output format) are kept
beside it in OUTPUT.genserve.json; a rerun with other settings is refused, and --restart starts over.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

from genserve.service.client import DEFAULT_URL
from genserve.service.services.anomaly import AnomalyResponse, AnomalyResult

FORMATS = ("csv", "jsonl")
EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
DEFAULT_CHUNK_SIZE = 512
SIDECAR_SUFFIX = ".genserve.json"
RETRIES = 4  # after the first try: 5 tries over ~7.5 s with the default delay
RETRY_DELAY_S = 0.5
SHOWN_BAD_ROWS = 5
# Refusals about the request as a whole rather than its rows: splitting the chunk would not help.
FATAL_STATUSES = frozenset({401, 403, 404, 405, 415})
FATAL_TYPES = frozenset({"model_not_found", "not_found", "not_calibrated", "unknown_score", "wrong_model_kind"})
SCORE_COLUMNS = ("score", "percentile", "is_anomaly", "log_prob", "threshold")
GMM_COLUMNS = ("component", "responsibility")


class ScoreFileError(Exception):
    """Fatal: the file cannot be scored (any further); the message says why and what to do."""


class RowError(ValueError):
    """One input row that cannot be scored; the message is the reason."""


class Rejected(Exception):
    """The model refused a batch of rows with a 4xx that may be about some of its rows."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Unavailable(Exception):
    """A 5xx or a connection failure: worth retrying."""


# ---- the model: what it takes, and a way to score a batch -------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: str
    kind: str  # gmm, pixelcnn, gpt, ...
    input_type: str  # records | image | text
    feature_names: tuple[str, ...] = ()
    height: int = 0
    width: int = 0
    levels: int = 0
    n_classes: int = 0
    max_per_request: int | None = None  # None: no limit (in-process)
    default_score: str | None = None  # the artifact's default score type; None: its kind's

    @classmethod
    def from_input(cls, name: str, version: str, kind: str, spec: Any, max_per_request: int | None,
                   default_score: str | None = None) -> ModelSpec:
        """From a ModelInfo's `input` or an artifact manifest's `input`: both name their fields alike."""
        return cls(name=name, version=version, kind=kind, input_type=spec.type, default_score=default_score,
                   feature_names=tuple(getattr(spec, "feature_names", None) or ()),
                   height=getattr(spec, "height", None) or 0, width=getattr(spec, "width", None) or 0,
                   levels=getattr(spec, "levels", None) or 0, n_classes=getattr(spec, "n_classes", None) or 0,
                   max_per_request=max_per_request)

    @property
    def is_gmm(self) -> bool:
        return self.kind == "gmm"


@dataclass(frozen=True)
class ScoreOptions:
    score: str | None = None
    threshold: float | None = None
    false_positive_rate: float | None = None


class Backend(Protocol):
    spec: ModelSpec

    def anomaly(self, items: list[Any], labels: list[int] | None, options: ScoreOptions) -> AnomalyResponse:
        """Scores of a batch; raises Rejected, Unavailable or ScoreFileError."""
        ...

    def close(self) -> None: ...


def classify_error(status: int, error_type: str, message: str) -> Exception:
    """The exception a refused request becomes: retry it, split it, or stop."""
    if status >= 500:
        return Unavailable(f"{status} {error_type}: {message}")
    if status in FATAL_STATUSES or error_type in FATAL_TYPES:
        return ScoreFileError(message)
    return Rejected(status, message)


class HttpBackend:
    """A running genserve server."""

    def __init__(self, url: str, name: str, timeout: float = 300.0, api_key: str | None = None):
        import httpx

        from genserve.service.client import GenserveClient, GenserveError

        self._transport_error, self._api_error = httpx.TransportError, GenserveError
        self.client = GenserveClient(url, timeout=timeout, api_key=api_key)
        self.name = name
        try:
            info = self.client.model(name)
        except httpx.TransportError as e:
            self.client.close()
            raise ScoreFileError(f"cannot reach the genserve server at {url} ({type(e).__name__}: {e}); start "
                                 "it with `genserve serve`, or score in this process with --local") from None
        except GenserveError as e:
            self.client.close()
            raise ScoreFileError(e.message) from None
        limits = info.limits
        limit = {"records": limits.max_records_per_request, "image": limits.max_images_per_request,
                 "text": limits.max_texts_per_request}[info.input.type]
        default = None if info.calibration is None else info.calibration.score
        self.spec = ModelSpec.from_input(info.name, info.version, info.kind, info.input, limit, default)

    def anomaly(self, items: list[Any], labels: list[int] | None, options: ScoreOptions) -> AnomalyResponse:
        common = {"score": options.score, "threshold": options.threshold,
                  "false_positive_rate": options.false_positive_rate}
        try:
            if self.spec.input_type == "records":
                return self.client.anomaly(self.name, items, **common)
            if self.spec.input_type == "image":
                return self.client.anomaly_images(self.name, items, labels=labels, **common)
            return self.client.anomaly_texts(self.name, items, **common)
        except self._api_error as e:
            raise classify_error(e.status_code, e.error_type, e.message) from None
        except self._transport_error as e:
            raise Unavailable(f"{type(e).__name__}: {e}") from None

    def close(self) -> None:
        self.client.close()


class LocalBackend:
    """The model loaded in this process from the store; no request limits."""

    def __init__(self, store: str | Path | None, name: str, runtime: str = "auto"):
        from genserve.artifacts.artifact import ArtifactError
        from genserve.service.local import LocalScorer  # loads torch: only for --local

        try:
            self.scorer = LocalScorer.from_store(store, name, runtime=runtime)
        except (ArtifactError, FileNotFoundError, ValueError) as e:
            raise ScoreFileError(str(e)) from None
        m = self.scorer.manifest
        cals = self.scorer.calibrations
        self.spec = ModelSpec.from_input(m.name, m.version, m.kind, m.input, None, cals and cals.default)

    def anomaly(self, items: list[Any], labels: list[int] | None, options: ScoreOptions) -> AnomalyResponse:
        from genserve.service.api.errors import status_of
        from genserve.service.errors import ServiceError

        key = {"records": "records", "image": "images", "text": "texts"}[self.spec.input_type]
        try:
            return self.scorer.anomaly(**{key: items}, labels=labels, score=options.score,
                                       threshold=options.threshold, false_positive_rate=options.false_positive_rate)
        except ServiceError as e:
            raise classify_error(status_of(e), e.type, e.message) from None

    def close(self) -> None:
        pass


# ---- reading the input ------------------------------------------------------------------------------------


@dataclass
class Row:
    line: int  # first physical line, 1-based
    id: Any = None
    item: Any = None  # a record (list of floats), an image (as given) or a text
    label: int | None = None
    error: str | None = None  # the reason it cannot be scored
    result: AnomalyResult | None = None
    threshold: float | None = None


class Lines:
    """The input's physical lines, decoded, numbered from 1, with the bytes read so far (for progress)."""

    def __init__(self, path: Path):
        self.path = path
        self.number = 0
        self.bytes_read = 0
        self.bad_utf8: set[int] = set()  # line numbers that were not UTF-8 (decoded with U+FFFD)

    def __iter__(self) -> Iterator[str]:
        with self.path.open("rb") as f:
            for raw in f:
                self.number += 1
                self.bytes_read += len(raw)
                encoding = "utf-8-sig" if self.number == 1 else "utf-8"
                try:
                    yield raw.decode(encoding)
                except UnicodeDecodeError:
                    self.bad_utf8.add(self.number)
                    yield raw.decode(encoding, errors="replace")

    def take_bad(self, first: int, last: int) -> bool:
        """Whether any of lines first..last was not UTF-8 (and forget them: the set stays small)."""
        found = [n for n in range(first, last + 1) if n in self.bad_utf8]
        self.bad_utf8.difference_update(found)
        return bool(found)


def shown_names(names: Iterable[str], n: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _json_type(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _number(value: Any, feature: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError(f"feature {feature!r}: {json.dumps(value)[:40]} is not a number")
    try:
        x = float(value)
    except OverflowError:
        raise RowError(f"feature {feature!r}: {str(value)[:40]}... is too large for a float") from None
    return _finite(x, feature)


def _fast_numbers(values: list) -> list[float] | None:
    """The values as floats when they are all finite JSON numbers (the common case, checked at C speed);
    None when some need a closer look (and an error message)."""
    if not all(type(v) is float or type(v) is int for v in values):  # type(): booleans are not numbers here
        return None
    try:
        xs = [float(v) for v in values]
    except OverflowError:
        return None
    return xs if all(map(math.isfinite, xs)) else None


def _finite(x: float, feature: str) -> float:
    if not math.isfinite(x):
        raise RowError(f"feature {feature!r} is {x}; values must be finite numbers")
    return x


def _cell_number(cell: str, feature: str) -> float:
    text = cell.strip()
    if not text:
        raise RowError(f"feature {feature!r} is empty")
    try:
        x = float(text)
    except ValueError:
        raise RowError(f"feature {feature!r}: {text[:40]!r} is not a number") from None
    return _finite(x, feature)


def _text(text: str) -> str:
    if not text.strip():
        raise RowError("the text is empty")  # the model scores no empty texts
    return text


class Parser:
    """Turns one input row (a parsed JSON value, or CSV cells) into the item to score, for one model."""

    def __init__(self, spec: ModelSpec, id_column: str | None):
        self.spec, self.id_column = spec, id_column

    # -- JSONL --

    def from_json(self, value: Any, row: Row) -> None:
        if self.id_column is not None and isinstance(value, dict):
            row.id = value.get(self.id_column)
        kind = self.spec.input_type
        if kind == "records":
            row.item = self._record(value)
        elif kind == "image":
            row.item, row.label = self._image(value)
        else:
            row.item = self._text(value)

    def _record(self, value: Any) -> list[float]:
        names = self.spec.feature_names
        if isinstance(value, dict) and "record" in value:
            value = value["record"]
        elif isinstance(value, dict):
            missing = [n for n in names if n not in value]
            if missing:
                raise RowError(f"missing feature{'s' * (len(missing) > 1)} {shown_names(missing)}; the model "
                               f"expects {len(names)} ({shown_names(names)})")
            return [_number(value[n], n) for n in names]
        if not isinstance(value, list):
            raise RowError(f"a JSON {_json_type(value)}; a record is an object keyed by the feature names, "
                           f'{{"record": [...]}}, or a list of {len(names)} numbers')
        return self._values(value)

    def _values(self, values: list) -> list[float]:
        names = self.spec.feature_names
        if len(values) != len(names):
            raise RowError(f"{len(values)} values, the model expects {len(names)} features ({shown_names(names)})")
        fast = _fast_numbers(values)
        return fast if fast is not None else [_number(v, n) for v, n in zip(values, names, strict=True)]

    def _image(self, value: Any) -> tuple[Any, int | None]:
        from genserve.service.image_codec import ImageInputError, decode_image

        s = self.spec
        label = None
        if isinstance(value, dict):
            if "image" not in value:
                raise RowError('no "image" key; an image row is {"image": rows of levels or a base64 PNG, '
                               '"label": optional class}')
            label, value = value.get("label"), value["image"]
        try:
            decode_image(value, "the image", s.height, s.width, s.levels)
        except ImageInputError as e:
            raise RowError(e.message) from None
        return value, self._label(label)

    def _label(self, label: Any) -> int | None:
        n = self.spec.n_classes
        if label is None:
            return None
        if n == 0:
            raise RowError(f"label {json.dumps(label)[:20]}: model {self.spec.name!r} is not class-conditional; "
                           "drop the label")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < n:
            raise RowError(f"label {json.dumps(label)[:20]} is not an integer in [0, {n - 1}]")
        return label

    @staticmethod
    def _text(value: Any) -> str:
        if isinstance(value, dict):
            if "text" not in value:
                raise RowError('no "text" key; a text row is {"text": "..."}')
            value = value["text"]
        if not isinstance(value, str):
            raise RowError(f"the text is a JSON {_json_type(value)}, not a string")
        return _text(value)

    # -- CSV --

    def columns(self, header: list[str], path: Path) -> dict[str, int]:
        """Where each needed column is in the header; a ScoreFileError naming what is missing."""
        position: dict[str, int] = {}
        for i, name in enumerate(header):
            position.setdefault(name.strip(), i)
        kind = self.spec.input_type
        if kind == "image":
            raise ScoreFileError(f"{path}: image models read JSONL ({{\"image\": ..., \"label\": ...}} per line), "
                                 "not CSV")
        needed = list(self.spec.feature_names) if kind == "records" else ["text"]
        if self.id_column is not None:
            needed.append(self.id_column)
        missing = [n for n in needed if n not in position]
        if missing:
            what = (f"model {self.spec.name!r} takes the columns {shown_names(self.spec.feature_names, 8)}"
                    if kind == "records" else f"model {self.spec.name!r} reads a 'text' column")
            raise ScoreFileError(f"{path}: no column{'s' * (len(missing) > 1)} {shown_names(missing, 8)} in the "
                                 f"header; {what} (other columns are ignored)")
        return {n: position[n] for n in needed}

    def from_cells(self, cells: list[str], header: list[str], columns: dict[str, int], row: Row) -> None:
        if self.id_column is not None and columns[self.id_column] < len(cells):
            row.id = cells[columns[self.id_column]]
        if len(cells) != len(header):
            raise RowError(f"{len(cells)} fields, the header has {len(header)}")
        if self.spec.input_type == "records":
            row.item = [_cell_number(cells[columns[n]], n) for n in self.spec.feature_names]
        else:
            row.item = _text(cells[columns["text"]])


class Reader:
    """The input's rows in order, each with its line number, parsed (or with the reason it cannot be)."""

    def __init__(self, path: Path, fmt: str, parser: Parser):
        self.path, self.fmt, self.parser = path, fmt, parser
        self.lines = Lines(path)
        self._header: list[str] = []
        self._columns: dict[str, int] = {}
        self._csv: Any = None
        if fmt == "csv":
            self._csv = csv.reader(iter(self.lines))
            self._read_header()

    def _read_header(self) -> None:
        # Before anything is scored, so a missing column stops the run at once.
        try:
            self._header = next(self._csv)
        except StopIteration:
            return  # an empty file: no rows
        except csv.Error as e:
            raise ScoreFileError(f"{self.path}: cannot read the CSV header ({e})") from None
        self._columns = self.parser.columns(self._header, self.path)

    @property
    def bytes_read(self) -> int:
        return self.lines.bytes_read

    def rows(self, after_line: int = 0) -> Iterator[Row]:
        """Every row whose first line comes after `after_line` (rows before it are read, not parsed)."""
        return self._csv_rows(after_line) if self.fmt == "csv" else self._jsonl_rows(after_line)

    def _jsonl_rows(self, after_line: int) -> Iterator[Row]:
        for text in self.lines:
            number = self.lines.number
            if number > after_line:
                yield self._jsonl_row(number, text)

    def _jsonl_row(self, number: int, text: str) -> Row:
        row = Row(line=number)
        try:
            if not text.strip():
                raise RowError("empty line")
            if self.lines.take_bad(number, number):
                raise RowError("not valid UTF-8")
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise RowError(f"not valid JSON: {e.msg} (column {e.colno})") from None
            self.parser.from_json(value, row)
        except RowError as e:
            row.error = str(e)
        return row

    def _csv_rows(self, after_line: int) -> Iterator[Row]:
        if not self._header:
            return
        while True:
            start = self._csv.line_num + 1
            row = Row(line=start)
            try:
                cells = next(self._csv)
            except StopIteration:
                return
            except csv.Error as e:  # the reader starts afresh on the next line
                row.error = f"not valid CSV: {e}"
                cells = None
            if start <= after_line:
                continue
            if cells is not None:
                self._csv_row(cells, row)
            yield row

    def _csv_row(self, cells: list[str], row: Row) -> None:
        try:
            if not cells:
                raise RowError("empty line")
            if self.lines.take_bad(row.line, self._csv.line_num):
                raise RowError("not valid UTF-8")
            self.parser.from_cells(cells, self._header, self._columns, row)
        except RowError as e:
            row.error = str(e)


# ---- scoring a chunk --------------------------------------------------------------------------------------


class ChunkScorer:
    """Scores the valid rows of a chunk, splitting a batch the model refuses until only the refused rows are
    left (they get its message), and retrying what fails for want of a server."""

    def __init__(self, backend: Backend, options: ScoreOptions, retries: int = RETRIES,
                 retry_delay: float = RETRY_DELAY_S):
        self.backend, self.options = backend, options
        self.retries, self.retry_delay = retries, retry_delay
        self.batch_limit = backend.spec.max_per_request or 1 << 62
        self.score_type: str | None = None
        self.requests = 0

    def score(self, rows: list[Row]) -> None:
        ready = [r for r in rows if r.error is None]
        # One request takes labels for all its images or for none: rows with and without go apart.
        for group in ([r for r in ready if r.label is None], [r for r in ready if r.label is not None]):
            for start in range(0, len(group), self.batch_limit):
                self._score(group[start:start + self.batch_limit])

    def _score(self, rows: list[Row]) -> None:
        if not rows:
            return
        try:
            response = self._call(rows)
        except Rejected as e:
            if len(rows) == 1:
                rows[0].error = e.message
                return
            if e.status == 413:  # too many or too large: later batches start smaller
                self.batch_limit = max(1, len(rows) // 2)
            half = len(rows) // 2
            self._score(rows[:half])
            self._score(rows[half:])
            return
        if len(response.results) != len(rows):
            raise ScoreFileError(f"the model answered {len(response.results)} results for {len(rows)} rows")
        self.score_type = response.score_type
        for row, result in zip(rows, response.results, strict=True):
            row.result, row.threshold = result, response.threshold

    def _call(self, rows: list[Row]) -> AnomalyResponse:
        items = [r.item for r in rows]
        labels = [r.label for r in rows] if rows[0].label is not None else None
        for attempt in range(self.retries + 1):
            self.requests += 1
            try:
                return self.backend.anomaly(items, labels, self.options)
            except Unavailable as e:
                if attempt == self.retries:
                    raise ScoreFileError(f"the model could not score the rows from line {rows[0].line} after "
                                         f"{attempt + 1} tries: {e}") from None
                time.sleep(self.retry_delay * 2**attempt)
        raise AssertionError("unreachable")


# ---- writing the output -----------------------------------------------------------------------------------


def output_columns(spec: ModelSpec, id_column: str | None) -> list[str]:
    return ["line", *(["id"] if id_column else []), *SCORE_COLUMNS, *(GMM_COLUMNS if spec.is_gmm else ()),
            "error"]


def row_values(row: Row, columns: list[str]) -> dict[str, Any]:
    r = row.result
    values: dict[str, Any] = {
        "line": row.line, "id": row.id,
        "score": r and r.score, "percentile": r and r.percentile, "is_anomaly": r and r.is_anomaly,
        "log_prob": r and r.log_prob, "threshold": row.threshold,
        "component": getattr(r, "component", None), "responsibility": getattr(r, "responsibility", None),
        "error": None if row.error is None else f"line {row.line}: {row.error}",
    }
    return {c: values[c] for c in columns}


def _csv_cell(value: Any) -> str:
    if type(value) is float:
        return repr(value)  # exact
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")  # one physical line per row
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def encode_rows(rows: Iterable[dict[str, Any]], fmt: str) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for r in rows:
        writer.writerow([_csv_cell(v) for v in r.values()])
    return buffer.getvalue().encode()


def encode_header(columns: list[str]) -> bytes:
    return (",".join(columns) + "\n").encode()


def decode_row(line: bytes, fmt: str, columns: list[str]) -> dict[str, Any]:
    """A row of the output back (CSV values stay strings); ValueError when it is not one."""
    if fmt == "jsonl":
        value = json.loads(line)
        if not isinstance(value, dict) or not isinstance(value.get("line"), int):
            raise ValueError("not an output row")
        return value
    (cells,) = list(csv.reader([line.decode()]))
    if len(cells) != len(columns):
        raise ValueError("not an output row")
    value = dict(zip(columns, cells, strict=True))
    value["line"] = int(value["line"])
    return value


def append(path: Path, data: bytes) -> None:
    """Append and make it durable before going on: what is in the file is what a rerun resumes from."""
    with path.open("ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# ---- resuming ---------------------------------------------------------------------------------------------


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.name + SIDECAR_SUFFIX)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _last_newline(f: Any, end: int, block: int = 1 << 16) -> int:
    """Offset of the last b"\\n" before `end`, or -1."""
    pos = end
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        found = f.read(pos - start).rfind(b"\n")
        if found >= 0:
            return start + found
        pos = start
    return -1


def cut_partial_line(path: Path) -> bytes:
    """Drop what follows the last line break (a line cut short by a crash); return the last whole line."""
    with path.open("r+b") as f:
        size = f.seek(0, os.SEEK_END)
        last = _last_newline(f, size)
        if last + 1 < size:
            f.truncate(last + 1)
            f.flush()
            os.fsync(f.fileno())
        if last < 0:
            return b""
        before = _last_newline(f, last)
        f.seek(before + 1)
        return f.read(last - before - 1)


def prepare_output(output: Path, fmt: str, columns: list[str], settings: dict[str, Any], restart: bool) -> int:
    """Make OUTPUT ready to append to; return the last input line it already holds (0: none)."""
    sidecar = sidecar_path(output)
    if restart:
        output.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
    if output.exists() and output.stat().st_size > 0:
        _check_settings(output, sidecar, settings)
        last = cut_partial_line(output)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_bytes(b"")
        _write_json(sidecar, settings)
        last = b""
    if fmt == "csv":
        return _resume_csv(output, columns, last)
    return _output_row(last, fmt, columns, output)["line"] if last else 0


def _output_row(line: bytes, fmt: str, columns: list[str], output: Path) -> dict[str, Any]:
    try:
        return decode_row(line, fmt, columns)
    except ValueError:
        raise ScoreFileError(f"{output}: {line[:80]!r} is not a row genserve score writes, so the file cannot be "
                             "continued; use --restart to discard it") from None


def _resume_csv(output: Path, columns: list[str], last: bytes) -> int:
    header = encode_header(columns)
    if not last:
        output.write_bytes(header)  # nothing whole was written, not even the header
        return 0
    with output.open("rb") as f:
        first = f.readline()
    if first != header:
        raise ScoreFileError(f"{output}: its header is not {header.decode().strip()!r}; use --restart to discard it")
    return 0 if last + b"\n" == header else _output_row(last, "csv", columns, output)["line"]


def _check_settings(output: Path, sidecar: Path, settings: dict[str, Any]) -> None:
    try:
        saved = json.loads(sidecar.read_text())
    except FileNotFoundError:
        raise ScoreFileError(f"{output} exists but was not written by genserve score (no {sidecar.name}); use "
                             "--restart to overwrite it, or choose another output") from None
    except (OSError, ValueError) as e:
        raise ScoreFileError(f"{sidecar} cannot be read ({e}); use --restart to start over") from None
    changed = [f"{k}: {saved.get(k)!r} then, {v!r} now" for k, v in settings.items() if saved.get(k) != v]
    if changed:
        raise ScoreFileError(f"{output} was written with other settings ({'; '.join(changed)}), so it cannot be "
                             "continued; use --restart to discard it and start over, or choose another output")


# ---- the run ----------------------------------------------------------------------------------------------


@dataclass
class Summary:
    input: Path
    output: Path
    model: str
    version: str
    score_type: str | None = None
    threshold: float | None = None
    rows: int = 0  # every input row, in the output
    scored: int = 0
    flagged: int = 0
    bad: int = 0
    bad_rows: list[str] = field(default_factory=list)  # the first few errors ("line N: reason")
    resumed_after_line: int = 0  # 0: this run started at the beginning
    rows_this_run: int = 0
    requests: int = 0

    def add(self, values: dict[str, Any]) -> None:
        self.rows += 1
        if values.get("error"):
            self.bad += 1
            if len(self.bad_rows) < SHOWN_BAD_ROWS:
                self.bad_rows.append(values["error"])
            return
        self.scored += 1
        self.flagged += values.get("is_anomaly") in (True, "true")
        if values.get("threshold") not in (None, ""):
            self.threshold = float(values["threshold"])

    def report(self) -> str:
        score = self.score_type or "the model's default score"
        threshold = "" if self.threshold is None else f", threshold {self.threshold:.6g}"
        resumed = f" (resumed after line {self.resumed_after_line})" if self.resumed_after_line else ""
        lines = [f"{self.input} with {self.model} v{self.version} ({score}{threshold}) -> {self.output}{resumed}",
                 f"{self.rows} rows read, {self.scored} scored, {self.flagged} flagged as anomalies, "
                 f"{self.bad} bad rows"]
        lines += [f"  {e}" for e in self.bad_rows]
        if self.bad > len(self.bad_rows):
            lines.append(f"  ... and {self.bad - len(self.bad_rows)} more (the error column of the output)")
        return "\n".join(lines)


def file_format(path: Path, given: str | None, what: str) -> str:
    if given is not None:
        if given not in FORMATS:
            raise ScoreFileError(f"{what} format {given!r}: use csv or jsonl")
        return given
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise ScoreFileError(f"{path}: cannot tell the {what} format from the extension {path.suffix!r}; name it "
                             f".csv or .jsonl, or say which with --{'format' if what == 'output' else 'input-format'}")
    return fmt


def check_options(options: ScoreOptions, chunk_size: int) -> None:
    if chunk_size < 1:
        raise ScoreFileError(f"chunk size {chunk_size}: at least 1")
    if options.threshold is not None and options.false_positive_rate is not None:
        raise ScoreFileError("give a threshold or a false-positive rate, not both")
    if options.threshold is not None and not math.isfinite(options.threshold):
        raise ScoreFileError(f"threshold {options.threshold}: a finite number")
    fpr = options.false_positive_rate
    if fpr is not None and not 0 < fpr < 1:
        raise ScoreFileError(f"false-positive rate {fpr}: strictly between 0 and 1")


def _score_type(spec: ModelSpec, score: str | None) -> str:
    from genserve.artifacts.scores import check_score

    try:
        return check_score(spec.input_type, score, spec.default_score)
    except ValueError as e:
        raise ScoreFileError(f"model {spec.name!r}: {e}") from None


def run_settings(spec: ModelSpec, options: ScoreOptions, input: Path, input_fmt: str, output_fmt: str,
                 id_column: str | None) -> dict[str, Any]:
    """What makes an output what it is: a rerun continues it only when these are unchanged."""
    return {"model": spec.name, "version": spec.version, "score": options.score, "threshold": options.threshold,
            "false_positive_rate": options.false_positive_rate, "id_column": id_column,
            "input": str(input.resolve()), "input_format": input_fmt, "input_size": input.stat().st_size,
            "output_format": output_fmt}


def tally_existing(output: Path, fmt: str, columns: list[str], summary: Summary) -> None:
    """Count the rows a previous run wrote, so the summary covers the whole output."""
    with output.open("rb") as f:
        if fmt == "csv":
            f.readline()
        for line in f:
            summary.add(_output_row(line.rstrip(b"\n"), fmt, columns, output))


def score_file(
    input: str | Path,
    model: str,
    output: str | Path,
    *,
    url: str = DEFAULT_URL,
    api_key: str | None = None,
    local: bool = False,
    store: str | Path | None = None,
    score: str | None = None,
    threshold: float | None = None,
    false_positive_rate: float | None = None,
    id_column: str | None = None,
    output_format: str | None = None,
    input_format: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    restart: bool = False,
    progress: bool = False,
    retries: int = RETRIES,
    retry_delay: float = RETRY_DELAY_S,
    on_chunk: Callable[[int], None] | None = None,
    backend: Backend | None = None,
) -> Summary:
    """Score every row of INPUT with MODEL into OUTPUT (see the module docstring), continuing a previous
    interrupted run with the same settings. `on_chunk(k)` is called after the k-th chunk is on disk.
    Raises ScoreFileError when the file cannot be scored (any further)."""
    input, output = Path(input), Path(output)
    options = ScoreOptions(score, threshold, false_positive_rate)
    check_options(options, chunk_size)
    input_fmt, output_fmt = file_format(input, input_format, "input"), file_format(output, output_format, "output")
    if not input.is_file() or not os.access(input, os.R_OK):
        raise ScoreFileError(f"{input}: no such readable file")
    if input.resolve() == output.resolve():
        raise ScoreFileError(f"{output}: the output would overwrite the input")
    owned = backend is None
    if backend is None:
        backend = LocalBackend(store, model) if local else HttpBackend(url, model, api_key=api_key)
    try:
        return _run(input, input_fmt, output, output_fmt, backend, options, id_column, chunk_size, restart,
                    progress, retries, retry_delay, on_chunk)
    finally:
        if owned:
            backend.close()


def _run(input: Path, input_fmt: str, output: Path, output_fmt: str, backend: Backend, options: ScoreOptions,
         id_column: str | None, chunk_size: int, restart: bool, progress: bool, retries: int, retry_delay: float,
         on_chunk: Callable[[int], None] | None) -> Summary:
    spec = backend.spec
    # The default score type is named in the settings and sent explicitly, so a resumed run cannot switch
    # score types under an output even if the default changes; an unknown type stops here, not per row.
    options = dataclasses.replace(options, score=_score_type(spec, options.score))
    reader = Reader(input, input_fmt, Parser(spec, id_column))  # a missing CSV column stops here
    columns = output_columns(spec, id_column)
    settings = run_settings(spec, options, input, input_fmt, output_fmt, id_column)
    after = prepare_output(output, output_fmt, columns, settings, restart)
    summary = Summary(input=input, output=output, model=spec.name, version=spec.version,
                      score_type=options.score, resumed_after_line=after)
    if after:
        tally_existing(output, output_fmt, columns, summary)
    scorer = ChunkScorer(backend, options, retries, retry_delay)
    size = chunk_size if spec.max_per_request is None else min(chunk_size, spec.max_per_request)
    rows = reader.rows(after)
    with _progress_bar(progress, input) as advance:
        k = 0
        while chunk := list(islice(rows, size)):
            try:
                scorer.score(chunk)
            except ScoreFileError as e:
                raise ScoreFileError(f"{e}\n{summary.rows} rows are in {output}; run the same command again to "
                                     "continue from there") from None
            values = [row_values(r, columns) for r in chunk]
            append(output, encode_rows(values, output_fmt))
            for v in values:
                summary.add(v)
            summary.rows_this_run += len(chunk)
            k += 1
            advance(reader.bytes_read)
            if on_chunk is not None:
                on_chunk(k)
        advance(reader.bytes_read)
    summary.score_type = scorer.score_type or summary.score_type
    summary.requests = scorer.requests
    return summary


@contextlib.contextmanager
def _progress_bar(enabled: bool, input: Path) -> Iterator[Callable[[int], None]]:
    """A bar over the input's bytes (rows are not known up front); shown only on a terminal."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield lambda done: None
        return
    columns = (TextColumn("scoring {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(input.name, total=input.stat().st_size)
        yield lambda done: bar.update(task, completed=done)

"""Streaming readers for every input the pipeline accepts.

A source is cut into *parts* (byte ranges of a CSV, groups of image files, TFRecord files) that
are read independently: in order by the local ingest, in parallel by the Beam ingest. Each part's
first pass gives a mergeable :class:`ProfileAcc` (column types, ranges, image sizes); the second
pass yields :class:`Batch` es of typed columns, with the inputs that cannot be used as
:class:`BadRecord` s. Nothing holds more than one block of the dataset in memory.

CSV is read with pyarrow block by block (about 4 MiB); a block that pyarrow cannot take whole
(a ragged row, a byte that is not UTF-8, a value that is not a number) is read again with Python's
``csv`` module, which names each bad row's line. Both give the same values, keys and kinds.

Feature kinds:
    ``float``  a scalar number (missing allowed)
    ``string`` a categorical value (missing allowed)
    ``vector`` a fixed-length float vector (NumPy ``x`` of rank 2)
    ``image``  uint8 pixels, resized to the source's :class:`Geometry` (``data.image_size`` and
               ``data.channels``, else the schema's, else inferred from the images)
"""

from __future__ import annotations

import abc
import csv
import hashlib
import io
import math
import os
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import PipelineError
from pipeline.config import DataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfrecord.gz", ".tfrecords.gz", ".tfr")


@dataclass
class Record:
    """One example: its split key, where it came from, its raw label and its features."""

    key: bytes
    origin: str
    label: str | None
    features: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class BadRecord:
    """An input that cannot be used; skipped and reported."""

    origin: str
    reason: str


@dataclass
class Profile:
    """What a first pass learned: each column's kind and numeric range, and the row count."""

    kinds: dict[str, str]
    ranges: dict[str, tuple[float, float]]
    rows: int
    label_kind: str  # "string" | "float"
    # The length of each vector feature (the most common one seen).
    vector_lengths: dict[str, int] = field(default_factory=dict)


@dataclass
class ProfileAcc:
    """One part's first pass; parts merge in any order (Beam combines them) to the same result."""

    rows: int = 0
    numeric: Counter[str] = field(default_factory=Counter)  # parsable values per column
    other: Counter[str] = field(default_factory=Counter)  # unparsable values per column
    lo: dict[str, float] = field(default_factory=dict)
    hi: dict[str, float] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)  # TFRecord: each feature's kind
    label_kinds: set[str] = field(default_factory=set)
    widths: set[int] = field(default_factory=set)  # CSV: field counts of rows that do not fit
    sizes: Counter[tuple[int, int]] = field(default_factory=Counter)  # images: (width, height)
    modes: Counter[str] = field(default_factory=Counter)
    lengths: dict[str, Counter[int]] = field(default_factory=dict)  # vector lengths

    def see(self, name: str, lo: float, hi: float) -> None:
        self.lo[name] = min(self.lo.get(name, math.inf), lo)
        self.hi[name] = max(self.hi.get(name, -math.inf), hi)

    def merge(self, other: ProfileAcc) -> ProfileAcc:
        self.rows += other.rows
        self.numeric.update(other.numeric)
        self.other.update(other.other)
        for name in other.lo:
            self.see(name, other.lo[name], other.hi[name])
        for name, kind in other.kinds.items():
            mine = self.kinds.get(name, kind)
            self.kinds[name] = min(mine, kind, key=_KIND_PRIORITY.index)
        self.label_kinds |= other.label_kinds
        self.widths |= other.widths
        self.sizes.update(other.sizes)
        self.modes.update(other.modes)
        for name, counts in other.lengths.items():
            self.lengths.setdefault(name, Counter()).update(counts)
        return self

    def ranges(self) -> dict[str, tuple[float, float]]:
        return {n: (self.lo[n], self.hi[n]) for n in self.lo if self.lo[n] <= self.hi[n]}

    def vector_lengths(self) -> dict[str, int]:
        # The most common length; ties go to the smaller, so the order of parts never matters.
        return {n: max(c, key=lambda k: (c[k], -k)) for n, c in self.lengths.items() if c}


# A feature seen as two kinds in different parts takes the first of these.
_KIND_PRIORITY = ("vector", "image", "string", "float")


@dataclass
class Batch:
    """Up to a few thousand examples as typed columns, and the inputs that could not be used.

    ``columns``: ``float`` → (float64 values, bool present) arrays; ``string`` → list of str or
    None; ``vector`` / ``image`` → list of arrays or None. ``labels``: str (classification) or a
    float64 array (regression). ``rows`` counts everything read, bad and unlabelled rows too.
    """

    keys: list[bytes]
    labels: list[str] | np.ndarray
    columns: dict[str, Any]
    meta: list[dict[str, Any]] | None = None
    bad: list[BadRecord] = field(default_factory=list)
    missing_label: int = 0
    rows: int = 0

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, index: np.ndarray) -> Batch:
        """The examples at ``index`` (bad records and counts stay with the original)."""
        picked = index.tolist()
        columns: dict[str, Any] = {}
        for name, col in self.columns.items():
            if isinstance(col, tuple):
                columns[name] = (col[0][index], col[1][index])
            else:
                columns[name] = [col[i] for i in picked]
        labels = (
            self.labels[index]
            if isinstance(self.labels, np.ndarray)
            else [self.labels[i] for i in picked]
        )
        meta = [self.meta[i] for i in picked] if self.meta is not None else None
        return Batch([self.keys[i] for i in picked], labels, columns, meta)


BATCH_ROWS = 2048


def batch_records(
    items: Iterable[Record | BadRecord],
    kinds: dict[str, str],
    label_kind: str,
    vector_lengths: dict[str, int],
) -> Iterator[Batch]:
    """Group records into batches: the columnar form of sources read one record at a time."""
    records: list[Record] = []
    bad: list[BadRecord] = []
    missing = rows = 0
    for item in items:
        rows += 1
        if isinstance(item, Record):
            item = _check_record(item, label_kind, vector_lengths)
        if isinstance(item, BadRecord):
            bad.append(item)
        elif item.label is None:
            missing += 1
        else:
            records.append(item)
        if rows >= BATCH_ROWS:
            yield _columnar(records, kinds, label_kind, bad, missing, rows)
            records, bad, missing, rows = [], [], 0, 0
    if rows:
        yield _columnar(records, kinds, label_kind, bad, missing, rows)


def _check_record(
    item: Record, label_kind: str, vector_lengths: dict[str, int]
) -> Record | BadRecord:
    if label_kind == "float" and item.label is not None:
        try:
            float(item.label)
        except ValueError:
            return BadRecord(item.origin, f"label {item.label!r} is not a number")
    for name, value in item.features.items():
        expected = vector_lengths.get(name)
        if isinstance(value, np.ndarray) and value.ndim == 1 and expected not in (None, len(value)):
            return BadRecord(
                item.origin, f"feature {name!r} has {len(value)} values, expected {expected}"
            )
    return item


def _columnar(
    records: list[Record],
    kinds: dict[str, str],
    label_kind: str,
    bad: list[BadRecord],
    missing: int,
    rows: int,
) -> Batch:
    columns: dict[str, Any] = {}
    for name, kind in kinds.items():
        values = [r.features.get(name) for r in records]
        if kind == "float":
            present = np.array([v is not None for v in values], dtype=bool)
            numbers = np.array([0.0 if v is None else v for v in values], dtype=np.float64)
            columns[name] = (numbers, present)
        else:
            columns[name] = values
    labels: list[str] | np.ndarray = [r.label for r in records]  # type: ignore[misc]
    if label_kind == "float":
        labels = np.array([float(x) for x in labels], dtype=np.float64)
    return Batch(
        [r.key for r in records], labels, columns, [r.meta for r in records], bad, missing, rows
    )


MAX_AUTO_SIDE = 160
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


@dataclass(frozen=True)
class Geometry:
    """The [height, width, channels] every image is converted to at ingest."""

    height: int
    width: int
    channels: int

    def fit(self, img: Any) -> np.ndarray:
        """A PIL image → uint8 array of this geometry (converted, then resized)."""
        from PIL import Image

        converted = img.convert("L" if self.channels == 1 else "RGB")
        if converted.size != (self.width, self.height):
            converted = converted.resize((self.width, self.height), Image.Resampling.BILINEAR)
        return np.asarray(converted, dtype=np.uint8).reshape(self.height, self.width, self.channels)


def needs_observation(cfg: DataConfig, known: dict[str, Any] | None, feature: str) -> bool:
    """Whether the images' sizes and modes are needed to decide the geometry."""
    shape = (known or {}).get(feature, {}).get("shape")
    return not ((cfg.image_size or shape) and (cfg.channels or shape))


def resolve_geometry(
    cfg: DataConfig,
    known: dict[str, Any] | None,
    feature: str,
    sizes: Counter[tuple[int, int]],
    modes: Counter[str],
) -> Geometry:
    """Explicit config first, then the schema's shape, then what the images look like.

    The inferred size keeps the images' median aspect ratio (height / width) with the longer
    side at the median longer side, capped at ``MAX_AUTO_SIDE`` (160): photos of mixed sizes get
    a typical shape, never the size of whichever image happens to be most common. Channels: 1 when
    every image is grayscale, else 3.
    """
    shape = (known or {}).get(feature, {}).get("shape")
    height, width = cfg.image_size or ((shape[0], shape[1]) if shape else (0, 0))
    channels = cfg.channels or (shape[2] if shape else 0)
    if not (height and channels):
        if not sizes:
            raise PipelineError("data.source: no readable image to infer data.image_size from")
        if not height:
            height, width = median_shape(sizes)
        if not channels:
            channels = 1 if set(modes) <= GRAY_MODES else 3
    return Geometry(int(height), int(width), int(channels))


def median_shape(sizes: Counter[tuple[int, int]]) -> tuple[int, int]:
    """(height, width) by the rule of :func:`resolve_geometry`."""
    counts = np.array(list(sizes.values()))
    wh = np.array(list(sizes.keys()), dtype=np.float64)
    aspect = float(np.median(np.repeat(wh[:, 1] / wh[:, 0], counts)))
    side = min(float(MAX_AUTO_SIDE), float(np.median(np.repeat(wh.max(axis=1), counts))))
    if aspect >= 1:
        return max(1, round(side)), max(1, round(side / aspect))
    return max(1, round(side * aspect)), max(1, round(side))


def _image_header(data: Any) -> tuple[tuple[int, int], str] | None:
    """(size, mode) from an image file or bytes without decoding the pixels; None if unreadable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            return img.size, img.mode
    except (OSError, ValueError, SyntaxError):
        return None


class Source(abc.ABC):
    """A streaming data source. ``geometry`` is set by :meth:`profile` for image data.

    Parts are small picklable descriptions (paths, byte ranges), so a Beam worker can read one
    with a copy of the source object.
    """

    geometry: Geometry | None = None

    def parts(self) -> list[Any]:
        return [None]

    @abc.abstractmethod
    def profile_part(self, part: Any, known: dict[str, Any] | None) -> ProfileAcc:
        """The first pass over one part."""

    @abc.abstractmethod
    def finish_profile(self, acc: ProfileAcc, known: dict[str, Any] | None) -> Profile:
        """Every part's first pass, merged, → the profile (and ``geometry``)."""

    def profile(self, known: dict[str, Any] | None) -> Profile:
        """First pass; ``known`` is the schema's features (None on a first ingest)."""
        acc = ProfileAcc()
        for part in self.parts():
            acc.merge(self.profile_part(part, known))
        return self.finish_profile(acc, known)

    @abc.abstractmethod
    def batches(
        self, kinds: dict[str, str], part: Any, label_kind: str, vector_lengths: dict[str, int]
    ) -> Iterator[Batch]:
        """The second pass over one part, as batches."""


class RecordSource(Source):
    """A source read one input at a time (images, NumPy rows, tf.Examples), batched here."""

    @abc.abstractmethod
    def records(self, kinds: dict[str, str], part: Any) -> Iterator[Record | BadRecord]:
        """The inputs of one part, one at a time."""

    def batches(
        self, kinds: dict[str, str], part: Any, label_kind: str, vector_lengths: dict[str, int]
    ) -> Iterator[Batch]:
        return batch_records(self.records(kinds, part), kinds, label_kind, vector_lengths)


def open_source(cfg: DataConfig) -> Source:
    """Pick the reader for ``cfg.source`` (``cfg.format`` or guessed from the path).

    Raises:
        PipelineError: the path does not exist or its format cannot be told.
    """
    if not cfg.source:
        raise PipelineError(
            "data.source: not set; pass --set data.source=PATH (a .csv, an image folder with "
            "a sub-folder per class, an .npz or TFRecord files) or a config that sets it "
            "(configs/digits.toml is the bundled example)"
        )
    path = Path(cfg.source)
    if not path.exists():
        raise PipelineError(f"data.source: {path} does not exist")
    fmt: str = cfg.format
    if fmt == "auto":
        fmt = _guess_format(path)
    if fmt == "images":
        return ImageFolderSource(path, cfg)
    if fmt == "csv":
        return CsvSource(path, cfg)
    if fmt == "npz":
        return NpzSource(path, cfg)
    return TFRecordSource(path, cfg)


def _guess_format(path: Path) -> str:
    name = path.name.lower()
    if path.is_file():
        if name.endswith(".csv"):
            return "csv"
        if name.endswith(".npz"):
            return "npz"
        if name.endswith(TFRECORD_SUFFIXES):
            return "tfrecord"
        raise PipelineError(
            f"data.source: cannot tell the format of {path}; set data.format "
            "(images, csv, npz, tfrecord)"
        )
    children = list(path.iterdir())
    if any(c.is_file() and c.name.lower().endswith(TFRECORD_SUFFIXES) for c in children):
        return "tfrecord"
    if any(c.is_dir() for c in children):
        return "images"
    raise PipelineError(
        f"data.source: {path} holds neither class sub-folders of images nor TFRecord files"
    )


def content_key(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


# --------------------------------------------------------------------------------------------
# Image folders


class ImageFolderSource(RecordSource):
    """``ROOT/CLASS/*.{jpg,jpeg,png,bmp,gif}``: the label is the sub-folder's name."""

    def __init__(self, root: Path, cfg: DataConfig):
        self.root = root
        self.cfg = cfg
        if not root.is_dir():
            raise PipelineError(f"data.source: {root} is not a directory of class folders")
        self._parts: list[Any] | None = None  # listed once: every pass reads the same files

    def _files(self) -> Iterator[tuple[str, Path]]:
        for class_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if class_dir.name.startswith("."):
                continue
            for path in sorted(class_dir.rglob("*")):
                if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                    yield class_dir.name, path

    def parts(self) -> list[Any]:
        if self._parts is not None:
            return self._parts
        files = [(label, str(path)) for label, path in self._files()]
        if not files:
            raise PipelineError(
                f"data.source: {self.root} has no images ({', '.join(IMAGE_EXTENSIONS)}) "
                "in class sub-folders"
            )
        self._parts = [
            files[i : i + self.PART_FILES] for i in range(0, len(files), self.PART_FILES)
        ]
        return self._parts

    PART_FILES = 2000

    def profile_part(self, part: Any, known: dict[str, Any] | None) -> ProfileAcc:
        acc = ProfileAcc(rows=len(part))
        if needs_observation(self.cfg, known, "image"):
            for _, path in part:
                header = _image_header(path)
                if header:
                    acc.sizes[header[0]] += 1
                    acc.modes[header[1]] += 1
        return acc

    def finish_profile(self, acc: ProfileAcc, known: dict[str, Any] | None) -> Profile:
        self.geometry = resolve_geometry(self.cfg, known, "image", acc.sizes, acc.modes)
        return Profile({"image": "image"}, {}, acc.rows, "string")

    def records(self, kinds: dict[str, str], part: Any) -> Iterator[Record | BadRecord]:
        from PIL import Image, UnidentifiedImageError

        assert self.geometry is not None, "profile() first"
        for label, name in part:
            path = Path(name)
            rel = path.relative_to(self.root).as_posix()
            try:
                with Image.open(path) as img:
                    img.load()  # raises on truncated or corrupt pixel data
                    size, mode = img.size, img.mode
                    pixels = self.geometry.fit(img)
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
                yield BadRecord(str(path), f"cannot decode image: {e}")
                continue
            yield Record(
                key=rel.encode(),
                origin=str(path),
                label=label,
                features={"image": pixels},
                meta={"width": size[0], "height": size[1], "mode": mode},
            )


# --------------------------------------------------------------------------------------------
# CSV


def _parse_float(text: str) -> float | None:
    """A number, or None when ``text`` is not one (empty is handled by the caller)."""
    try:
        return float(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class CsvPart:
    """Rows of a CSV between two byte offsets; ``line`` is the first row's line number."""

    start: int
    end: int
    line: int


def _last_row_end(data: bytes) -> int:
    """The offset just after the last newline of ``data`` that is outside quotes, or -1.

    ``data`` starts at a row boundary, so a newline is outside quotes exactly when the number of
    quote characters before it is even (an escaped quote is two of them).
    """
    quotes = data.count(b'"')
    pos = len(data)
    while True:
        nl = data.rfind(b"\n", 0, pos)
        if nl < 0:
            return -1
        quotes -= data.count(b'"', nl, pos)
        if quotes % 2 == 0:
            return nl + 1
        pos = nl


class CsvSource(Source):
    """A CSV file with a header row; the label is ``data.label_column``."""

    BLOCK = 4 << 20  # bytes parsed at once
    PART = 64 << 20  # bytes per part at most (a unit of parallel work)

    def __init__(self, path: Path, cfg: DataConfig):
        self.path = path
        self.label_column = cfg.label_column
        self.key_column = cfg.key_column
        self.delimiter = cfg.csv_delimiter
        self.max_bad_fraction = cfg.max_bad_fraction
        self.missing = frozenset(cfg.missing_values) | {""}
        self.header, self.data_start, self.data_line = self._read_header()
        self._parts: list[CsvPart] | None = None

    def _read_header(self) -> tuple[list[str], int, int]:
        with open(self.path, "rb") as f:
            data = f.read(1 << 20)
            while True:
                end = _first_row_end(data)
                more = f.read(1 << 20) if end < 0 else b""
                if not more:
                    break
                data += more
        if end < 0:
            end = len(data)
        raw = data[:end]
        if raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        # surrogateescape: an invalid byte is kept as a lone surrogate and reported with the
        # line it is on (a strict decoder fails on the whole read-ahead block, "line 1").
        text = raw.decode("utf-8", "surrogateescape")
        try:
            header = next(csv.reader(io.StringIO(text, newline=""), delimiter=self.delimiter))
        except StopIteration:
            raise PipelineError(f"{self.path}: empty file; a header row is required") from None
        except csv.Error as e:
            raise PipelineError(f"{self.path}: line 1: cannot read header: {e}") from e
        header = [h.strip() for h in header]
        if any(_undecodable(h) for h in header):
            raise PipelineError(f"{self.path}: line 1: the header is not valid UTF-8")
        if len(header) == 1:
            guess = next((d for d in (";", "\t", "|") if d in header[0]), None)
            if guess is not None:
                raise PipelineError(
                    f"{self.path}: line 1: one column {header[0][:60]!r}: the file looks "
                    f"{guess!r}-delimited; set data.csv_delimiter = {guess!r}"
                )
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes or "" in header:
            raise PipelineError(
                f"{self.path}: line 1: header has "
                + (f"duplicate columns {dupes}" if dupes else "an empty column name")
            )
        if self.label_column not in header:
            raise PipelineError(
                f"{self.path}: line 1: label column {self.label_column!r} not in header "
                f"{header}; set data.label_column"
            )
        if self.key_column and self.key_column not in header:
            raise PipelineError(
                f"{self.path}: line 1: key column {self.key_column!r} not in header {header}"
            )
        return header, end, 1 + data[:end].count(b"\n")

    def _blocks(self, part: CsvPart, size: int = 0) -> Iterator[tuple[bytes, int]]:
        """(bytes, line of its first row) of about ``size`` (``BLOCK``) bytes, cut between
        rows."""
        size = size or self.BLOCK
        line = part.line
        with open(self.path, "rb") as f:
            f.seek(part.start)
            pos, carry = part.start, b""
            while pos < part.end or carry:
                want = min(size, part.end - pos)
                data = carry + f.read(want)
                pos += want
                if pos >= part.end:
                    block, carry = data, b""
                else:
                    cut = _last_row_end(data)
                    if cut <= 0:  # one row longer than a block: read on
                        carry = data
                        continue
                    block, carry = data[:cut], data[cut:]
                if block:
                    yield block, line
                line += block.count(b"\n")

    def parts(self) -> list[Any]:
        if self._parts is None:
            size = self.path.stat().st_size
            whole = CsvPart(self.data_start, size, self.data_line)
            # A file of one block is one part; a larger one gets enough parts to keep every
            # core busy (workers for two blocks already beat one process), each within PART.
            data = size - self.data_start
            target = min(self.PART, max(self.BLOCK, data // (4 * _cores())))
            if data <= min(self.PART, self.BLOCK):
                self._parts = [whole]
            else:
                self._parts = []
                start, line, pos = self.data_start, self.data_line, self.data_start
                for block, first in self._blocks(whole, max(1, target // 8)):
                    pos += len(block)
                    if pos - start >= target or pos >= size:
                        end_line = first + block.count(b"\n")
                        self._parts.append(CsvPart(start, pos, line))
                        start, line = pos, end_line
        return self._parts

    # -- first pass -------------------------------------------------------------------------

    def profile_part(self, part: Any, known: dict[str, Any] | None) -> ProfileAcc:
        """Count, per column, the values that parse as numbers and those that do not."""
        acc = ProfileAcc()
        for block, line in self._blocks(part):
            fast = self._arrow_profile(block)
            acc.merge(fast if fast is not None else self._python_profile(block, line))
        return acc

    def _arrow_profile(self, block: bytes) -> ProfileAcc | None:
        import pyarrow as pa
        import pyarrow.compute as pc

        table = self._arrow_table(block)
        if table is None:
            return None
        acc = ProfileAcc(rows=table.num_rows)
        for name in self.header:
            text = pc.utf8_trim_whitespace(table.column(name))
            text = text.filter(pc.invert(pc.is_in(text, value_set=self._missing_array())))
            if not len(text):
                continue
            try:
                values = pc.cast(text, pa.float64()).to_numpy()
            except pa.ArrowInvalid:  # some values are not numbers: look at each distinct one
                counts = pc.value_counts(text)
                for value, n in zip(
                    counts.field("values").to_pylist(), counts.field("counts").to_pylist()
                ):
                    self._profile_value(acc, name, value, n)
                continue
            acc.numeric[name] += len(values)
            finite = values[np.isfinite(values)]
            if finite.size:
                acc.see(name, float(finite.min()), float(finite.max()))
        return acc

    def _python_profile(self, block: bytes, line: int) -> ProfileAcc:
        acc = ProfileAcc()
        reader = self._python_reader(block)
        try:
            for row in reader:
                if not row or len(row) != len(self.header) or any(_undecodable(v) for v in row):
                    acc.widths.add(len(row))
                    continue
                acc.rows += 1
                for name, text in zip(self.header, row):
                    text = text.strip()
                    if text not in self.missing:
                        self._profile_value(acc, name, text)
        except csv.Error as e:
            raise PipelineError(f"{self.path}: line {line - 1 + reader.line_num}: {e}") from e
        return acc

    @staticmethod
    def _profile_value(acc: ProfileAcc, name: str, text: str, n: int = 1) -> None:
        value = _parse_float(text)
        if value is None:
            acc.other[name] += n
        else:
            acc.numeric[name] += n
            if math.isfinite(value):
                acc.see(name, value, value)

    def finish_profile(self, acc: ProfileAcc, known: dict[str, Any] | None) -> Profile:
        """Each column's kind: numeric when (nearly) every non-empty value parses.

        A column whose unparsable values stay within ``data.max_bad_fraction`` of its non-empty
        values is still numeric; those rows become bad records in the second pass.
        """
        if acc.rows == 0:
            widths = acc.widths - {0}
            raise PipelineError(
                f"{self.path}: no data rows after the header"
                + (
                    f": every row has {sorted(widths)} fields, the header {len(self.header)}; "
                    "check data.csv_delimiter"
                    if widths
                    else ""
                )
            )
        kinds: dict[str, str] = {}
        ranges: dict[str, tuple[float, float]] = {}
        found = acc.ranges()
        for name in self.header:
            seen = acc.numeric[name] + acc.other[name]
            is_numeric = seen > 0 and acc.other[name] <= self.max_bad_fraction * seen
            kinds[name] = "float" if is_numeric else "string"
            if is_numeric and name in found:
                ranges[name] = found[name]
        label_kind = kinds.pop(self.label_column)
        if self.label_column in ranges:
            ranges["__label__"] = ranges.pop(self.label_column)
        if self.key_column:
            kinds.pop(self.key_column, None)
            ranges.pop(self.key_column, None)
        return Profile(kinds, ranges, acc.rows, label_kind)

    # -- second pass ------------------------------------------------------------------------

    def batches(
        self, kinds: dict[str, str], part: Any, label_kind: str, vector_lengths: dict[str, int]
    ) -> Iterator[Batch]:
        for block, line in self._blocks(part):
            fast = self._arrow_batch(block, kinds, label_kind)
            if fast is not None:
                yield fast
            else:  # the exact, row-by-row reading that names each bad row's line
                yield from batch_records(
                    self._python_records(block, line, kinds), kinds, label_kind, vector_lengths
                )

    def _missing_array(self) -> Any:
        import pyarrow as pa

        return pa.array(sorted(self.missing), pa.string())

    def _arrow_table(self, block: bytes) -> Any:
        """The block as a table of string columns, or None when pyarrow cannot take it whole."""
        import pyarrow as pa
        import pyarrow.csv as pcsv

        try:
            return pcsv.read_csv(
                io.BytesIO(block),
                read_options=pcsv.ReadOptions(column_names=self.header),
                parse_options=pcsv.ParseOptions(
                    delimiter=self.delimiter, newlines_in_values=b'"' in block
                ),
                convert_options=pcsv.ConvertOptions(
                    column_types=dict.fromkeys(self.header, pa.string()),
                    strings_can_be_null=False,
                    quoted_strings_can_be_null=False,
                ),
            )
        except pa.ArrowInvalid:
            return None

    def _arrow_batch(self, block: bytes, kinds: dict[str, str], label_kind: str) -> Batch | None:
        import pyarrow as pa
        import pyarrow.compute as pc

        table = self._arrow_table(block)
        if table is None:
            return None
        rows = table.num_rows
        # raw: the stripped values (the split key); text: missing-value markers made "".
        raw = {h: pc.utf8_trim_whitespace(table.column(h).combine_chunks()) for h in self.header}
        missing = self._missing_array()
        text = {h: pc.if_else(pc.is_in(col, value_set=missing), "", col) for h, col in raw.items()}
        labelled = pc.not_equal(text[self.label_column], "").to_numpy(zero_copy_only=False)
        keep = np.flatnonzero(labelled)
        if len(keep) < rows:
            index = pa.array(keep)
            raw = {h: col.take(index) for h, col in raw.items()}
            text = {h: col.take(index) for h, col in text.items()}
        labels: list[str] | np.ndarray
        try:
            if label_kind == "float":
                labels = pc.cast(text[self.label_column], pa.float64()).to_numpy()
            else:
                labels = text[self.label_column].to_pylist()
            columns: dict[str, Any] = {}
            for name, kind in kinds.items():
                if name not in text:  # a schema column missing from this file: the gate says so
                    columns[name] = (
                        (np.zeros(len(keep)), np.zeros(len(keep), dtype=bool))
                        if kind == "float"
                        else [None] * len(keep)
                    )
                elif kind == "float":
                    present = pc.not_equal(text[name], "")
                    values = pc.cast(pc.if_else(present, text[name], "0"), pa.float64())
                    columns[name] = (
                        values.to_numpy(),
                        present.to_numpy(zero_copy_only=False),
                    )
                else:
                    columns[name] = [v or None for v in text[name].to_pylist()]
        except pa.ArrowInvalid:  # a value that is not a number: the row-by-row path names it
            return None
        if self.key_column:
            keys = [v.encode() for v in raw[self.key_column].to_pylist()]
        else:
            keys = _content_keys([raw[h] for h in self.header])
        return Batch(keys, labels, columns, None, [], rows - len(keep), rows)

    def _python_reader(self, block: bytes) -> Any:
        text = block.decode("utf-8", "surrogateescape")
        return csv.reader(io.StringIO(text, newline=""), delimiter=self.delimiter)

    def _python_records(
        self, block: bytes, first_line: int, kinds: dict[str, str]
    ) -> Iterator[Record | BadRecord]:
        header = self.header
        reader = self._python_reader(block)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                yield BadRecord(f"{self.path}:{first_line - 1 + reader.line_num}", str(e))
                continue
            origin = f"{self.path}:{first_line - 1 + reader.line_num}"
            if not row:
                continue
            if len(row) != len(header):
                yield BadRecord(origin, f"expected {len(header)} fields, got {len(row)}")
                continue
            broken = next((v for v in row if _undecodable(v)), None)
            if broken is not None:
                byte = next(ord(c) - 0xDC00 for c in broken if "\udc80" <= c <= "\udcff")
                yield BadRecord(origin, f"not valid UTF-8 (byte 0x{byte:02x})")
                continue
            values = dict(zip(header, (v.strip() for v in row)))
            features: dict[str, Any] = {}
            bad = None
            for name, kind in kinds.items():
                if name not in values:
                    continue  # a schema column missing from this file: reported by the gate
                text = values[name]
                if text in self.missing:
                    features[name] = None
                elif kind == "float":
                    number = _parse_float(text)
                    if number is None:
                        bad = f"column {name!r}: cannot parse {text!r} as a number"
                        break
                    features[name] = number
                else:
                    features[name] = text
            if bad:
                yield BadRecord(origin, bad)
                continue
            if self.key_column:
                key = values[self.key_column].encode()
            else:
                key = content_key(*(values[h].encode() for h in header))
            label = values[self.label_column]
            yield Record(key, origin, None if label in self.missing else label, features)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _first_row_end(data: bytes) -> int:
    """The offset just after the first newline of ``data`` outside quotes, or -1."""
    pos = 0
    quotes = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            return -1
        quotes += data.count(b'"', pos, nl)
        if quotes % 2 == 0:
            return nl + 1
        pos = nl + 1


def _content_keys(columns: list[Any]) -> list[bytes]:
    """:func:`content_key` of every row of these string columns, built by pyarrow."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = len(columns[0])
    pieces = []
    for col in columns:
        data = col.cast(pa.binary())
        lengths = pc.binary_length(data).to_numpy(zero_copy_only=False).astype("<u8")
        prefix = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(8), rows, [None, pa.py_buffer(lengths.tobytes())]
        )
        pieces += [prefix.cast(pa.binary()), data]
    joined = pc.binary_join_element_wise(*pieces, b"")
    sha = hashlib.sha256
    return [h.digest() for h in map(sha, joined.to_pylist())]


# --------------------------------------------------------------------------------------------
# NumPy .npz


class _NpyStream:
    """Reads rows of one array inside an .npz archive without loading the whole array."""

    def __init__(self, archive: zipfile.ZipFile, name: str, origin: str):
        try:
            self.f = archive.open(name + ".npy")
        except KeyError:
            raise PipelineError(f"{origin}: no array named {name!r}") from None
        version = np.lib.format.read_magic(self.f)
        reader = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if reader is None:
            raise PipelineError(f"{origin}: {name}.npy has unsupported format {version}")
        self.shape, fortran, self.dtype = reader(self.f)  # type: ignore[operator]
        if fortran and len(self.shape) > 1:
            raise PipelineError(f"{origin}: {name} is Fortran-ordered; save it C-ordered")
        if self.dtype.hasobject:
            raise PipelineError(f"{origin}: {name} holds Python objects; not supported")
        if not self.shape:
            raise PipelineError(f"{origin}: {name} is a scalar; expected one row per example")
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        left = self.shape[0]
        while left > 0:
            n = min(rows, left)
            buf = self.f.read(n * self.row_bytes)
            if len(buf) != n * self.row_bytes:
                raise PipelineError("truncated array data")
            yield np.frombuffer(buf, dtype=self.dtype).reshape((n, *self.row_shape))
            left -= n


class NpzSource(RecordSource):
    """``np.savez(path, x=..., y=...)``: rank-2 ``x`` is a feature vector, rank 3/4 an image."""

    CHUNK = 1024

    def __init__(self, path: Path, cfg: DataConfig):
        self.path = path
        self.cfg = cfg

    def _open(self) -> tuple[zipfile.ZipFile, _NpyStream, _NpyStream]:
        try:
            archive = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile as e:
            raise PipelineError(f"{self.path}: not an .npz archive: {e}") from e
        x = _NpyStream(archive, "x", str(self.path))
        y = _NpyStream(archive, "y", str(self.path))
        if x.shape[0] != y.shape[0]:
            raise PipelineError(f"{self.path}: x has {x.shape[0]} rows but y has {y.shape[0]}")
        if len(y.shape) != 1:
            raise PipelineError(f"{self.path}: y must be 1-D, got shape {y.shape}")
        if len(x.shape) not in (2, 3, 4):
            raise PipelineError(
                f"{self.path}: x must have rank 2 (features) or 3/4 (images), got {x.shape}"
            )
        return archive, x, y

    def profile_part(self, part: Any, known: dict[str, Any] | None) -> ProfileAcc:
        archive, x, y = self._open()
        with archive:
            acc = ProfileAcc(rows=x.shape[0])
            acc.label_kinds.add("string" if y.dtype.kind in "biuSUO" else "float")
            if len(x.shape) == 2:
                acc.kinds["x"] = "vector"
                acc.lengths["x"] = Counter({x.shape[1]: x.shape[0]})
                for chunk in x.chunks(self.CHUNK):
                    finite = chunk[np.isfinite(chunk)] if chunk.dtype.kind == "f" else chunk
                    if finite.size:
                        acc.see("x", float(finite.min()), float(finite.max()))
            else:
                acc.kinds["image"] = "image"
                h, w = x.row_shape[:2]
                c = x.row_shape[2] if len(x.row_shape) == 3 else 1
                acc.sizes[(w, h)] = x.shape[0]
                acc.modes["L" if c == 1 else "RGB"] = x.shape[0]
            return acc

    def finish_profile(self, acc: ProfileAcc, known: dict[str, Any] | None) -> Profile:
        if "image" in acc.kinds:
            self.geometry = resolve_geometry(self.cfg, known, "image", acc.sizes, acc.modes)
        label_kind = min(acc.label_kinds)  # "float" only when y is a float array
        return Profile(dict(acc.kinds), acc.ranges(), acc.rows, label_kind, acc.vector_lengths())

    def records(self, kinds: dict[str, str], part: Any) -> Iterator[Record | BadRecord]:
        from PIL import Image

        archive, x, y = self._open()
        geometry = self.geometry
        row = 0
        with archive:
            for xs, ys in zip(x.chunks(self.CHUNK), y.chunks(self.CHUNK)):
                for xi, yi in zip(xs, ys):
                    origin = f"{self.path}:row {row}"
                    row += 1
                    label = yi.item()
                    label_text = label.decode() if isinstance(label, bytes) else str(label)
                    key = content_key(np.ascontiguousarray(xi).tobytes(), label_text.encode())
                    if "vector" in kinds.values():
                        yield Record(key, origin, label_text, {"x": xi.astype(np.float64)})
                        continue
                    img = xi if xi.ndim == 3 else xi[:, :, None]
                    if img.dtype != np.uint8:
                        if not np.all(np.isfinite(img)) or img.min() < 0 or img.max() > 255:
                            yield BadRecord(origin, "image values must be finite and in [0, 255]")
                            continue
                        img = img.astype(np.uint8)
                    meta = {"width": img.shape[1], "height": img.shape[0]}
                    meta["mode"] = {1: "L", 3: "RGB", 4: "RGBA"}.get(img.shape[2], "?")
                    assert geometry is not None, "profile() first"
                    if img.shape != (geometry.height, geometry.width, geometry.channels):
                        img = geometry.fit(
                            Image.fromarray(img.squeeze(-1) if img.shape[2] == 1 else img)
                        )
                    yield Record(key, origin, label_text, {"image": img}, meta)


# --------------------------------------------------------------------------------------------
# TFRecord of tf.Example


class TFRecordSource(RecordSource):
    """TFRecord files of ``tf.Example`` (GZIP when the name ends in ``.gz``)."""

    def __init__(self, path: Path, cfg: DataConfig):
        self.files = (
            sorted(p for p in path.iterdir() if p.name.lower().endswith(TFRECORD_SUFFIXES))
            if path.is_dir()
            else [path]
        )
        self.cfg = cfg

    def parts(self) -> list[Any]:
        if not self.files:
            raise PipelineError(f"data.source: no TFRecord files in {self.cfg.source}")
        return [str(p) for p in self.files]

    def _examples(self, files: list[str]) -> Iterator[tuple[str, bytes | None, str]]:
        from pipeline.console import quiet_tensorflow

        tf = quiet_tensorflow()

        for path in files:
            compression = "GZIP" if path.lower().endswith(".gz") else ""
            index = 0
            try:
                for raw in tf.data.TFRecordDataset(path, compression_type=compression):
                    yield f"{path}:record {index}", raw.numpy(), ""
                    index += 1
            except tf.errors.OpError as e:
                yield f"{path}:record {index}", None, f"corrupt TFRecord data: {e.message}"

    @staticmethod
    def _decode(raw: bytes) -> dict[str, tuple[str, list[Any]]]:
        import tensorflow as tf

        example = tf.train.Example.FromString(raw)
        out: dict[str, tuple[str, list[Any]]] = {}
        for name, feat in example.features.feature.items():
            kind = feat.WhichOneof("kind")
            if kind == "bytes_list":
                out[name] = ("bytes", list(feat.bytes_list.value))
            elif kind == "float_list":
                out[name] = ("float", list(feat.float_list.value))
            elif kind == "int64_list":
                out[name] = ("int", list(feat.int64_list.value))
        return out

    def profile_part(self, part: Any, known: dict[str, Any] | None) -> ProfileAcc:
        acc = ProfileAcc()
        kinds = acc.kinds
        for _origin, raw, _error in self._examples([part]):
            if raw is None:
                continue
            try:
                feats = self._decode(raw)
            except Exception:  # noqa: BLE001 - a corrupt proto is a bad record in pass two
                continue
            acc.rows += 1
            for name, (kind, values) in feats.items():
                if name == self.cfg.label_column:
                    acc.label_kinds.add("float" if kind == "float" else "string")
                    continue
                if kind == "bytes":
                    guess = "image" if values and _looks_like_image(values[0]) else "string"
                elif len(values) > 1 or kinds.get(name) == "vector":
                    guess = "vector"
                else:
                    guess = "float"
                if guess == "vector" and kinds.get(name) == "float":
                    kinds[name] = "vector"
                kinds.setdefault(name, guess)
                if guess == "vector":
                    lengths = acc.lengths.setdefault(name, Counter())
                    if len(lengths) < 100 or len(values) in lengths:
                        lengths[len(values)] += 1
                if guess == "image" and sum(acc.sizes.values()) < 10000:
                    header = _image_header(values[0])
                    if header:
                        acc.sizes[header[0]] += 1
                        acc.modes[header[1]] += 1
                if guess in ("float", "vector") and values:
                    finite = [v for v in values if math.isfinite(v)]
                    if finite:
                        acc.see(name, min(finite), max(finite))
        return acc

    def finish_profile(self, acc: ProfileAcc, known: dict[str, Any] | None) -> Profile:
        if acc.rows == 0:
            raise PipelineError(f"data.source: no readable tf.Example in {self.cfg.source}")
        if not acc.label_kinds:
            raise PipelineError(
                f"data.source: no example has the label feature {self.cfg.label_column!r}"
            )
        images = [n for n, k in acc.kinds.items() if k == "image"]
        if images:
            self.geometry = resolve_geometry(self.cfg, known, images[0], acc.sizes, acc.modes)
        # A label seen as bytes anywhere is a string label.
        label_kind = "string" if "string" in acc.label_kinds else "float"
        ranges = {n: r for n, r in acc.ranges().items() if n in acc.kinds}
        return Profile(dict(acc.kinds), ranges, acc.rows, label_kind, acc.vector_lengths())

    def records(self, kinds: dict[str, str], part: Any) -> Iterator[Record | BadRecord]:
        from PIL import Image

        geometry = self.geometry
        for origin, raw, error in self._examples([part]):
            if raw is None:
                yield BadRecord(origin, error)
                continue
            try:
                feats = self._decode(raw)
            except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError
                yield BadRecord(origin, f"not a tf.Example: {e}")
                continue
            label = None
            if self.cfg.label_column in feats:
                _, values = feats[self.cfg.label_column]
                if values:
                    v = values[0]
                    label = v.decode() if isinstance(v, bytes) else str(v)
            features: dict[str, Any] = {}
            meta: dict[str, Any] = {}
            bad = None
            for name, kind in kinds.items():
                if name not in feats or not feats[name][1]:
                    features[name] = None
                    continue
                _, values = feats[name]
                if kind == "image":
                    try:
                        assert geometry is not None, "profile() first"
                        with Image.open(io.BytesIO(values[0])) as img:
                            img.load()
                            meta = {"width": img.size[0], "height": img.size[1], "mode": img.mode}
                            features[name] = geometry.fit(img)
                    except (OSError, ValueError, SyntaxError) as e:
                        bad = f"feature {name!r}: cannot decode image: {e}"
                        break
                elif kind == "string":
                    v = values[0]
                    features[name] = v.decode(errors="replace") if isinstance(v, bytes) else str(v)
                elif kind == "vector":
                    features[name] = np.asarray(values, dtype=np.float64)
                else:
                    v = values[0]
                    if isinstance(v, bytes):
                        parsed = _parse_float(v.decode(errors="replace"))
                        if parsed is None:
                            bad = f"feature {name!r}: {v!r} is not a number"
                            break
                        v = parsed
                    features[name] = float(v)
            if bad:
                yield BadRecord(origin, bad)
                continue
            yield Record(content_key(raw), origin, label, features, meta)


def _looks_like_image(data: bytes) -> bool:
    return (
        data[:8] == b"\x89PNG\r\n\x1a\n"
        or data[:3] == b"\xff\xd8\xff"
        or data[:2] == b"BM"
        or (data[:4] == b"GIF8")
    )


def _undecodable(text: str) -> bool:
    """Whether ``text`` holds a byte that was not UTF-8 (a surrogateescape surrogate)."""
    return any("\udc80" <= c <= "\udcff" for c in text)

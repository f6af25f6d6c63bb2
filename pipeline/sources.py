"""Streaming readers for every input the pipeline accepts.

Each source yields :class:`Record` or :class:`BadRecord` one at a time; none holds the dataset in
memory. Sources that need column types (CSV, NumPy, TFRecord) first :meth:`~Source.profile` the
data in a separate streaming pass, so the second pass can write typed ``tf.Example`` features.

Feature kinds:
    ``float``  a scalar number (missing allowed)
    ``string`` a categorical value (missing allowed)
    ``vector`` a fixed-length float vector (NumPy ``x`` of rank 2)
    ``image``  uint8 pixels, resized to the source's :class:`Geometry` (``data.image_size`` and
               ``data.channels``, else the schema's, else inferred from the images)
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import zipfile
from collections import Counter
from collections.abc import Iterator
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


def resolve_geometry(
    cfg: DataConfig,
    known: dict[str, Any] | None,
    feature: str,
    observe: Any,
) -> Geometry:
    """Explicit config first, then the schema's shape, then what the data looks like.

    ``observe()`` returns (Counter of (width, height), Counter of PIL modes) and is only called
    when something is left to infer.
    """
    shape = (known or {}).get(feature, {}).get("shape")
    height, width = cfg.image_size or ((shape[0], shape[1]) if shape else (0, 0))
    channels = cfg.channels or (shape[2] if shape else 0)
    if not (height and channels):
        sizes, modes = observe()
        if not sizes:
            raise PipelineError("data.source: no readable image to infer data.image_size from")
        if not height:
            (w, h), _ = sizes.most_common(1)[0]
            scale = min(1.0, MAX_AUTO_SIDE / max(w, h))
            height, width = max(1, round(h * scale)), max(1, round(w * scale))
        if not channels:
            channels = 1 if set(modes) <= GRAY_MODES else 3
    return Geometry(int(height), int(width), int(channels))


def _image_header(data: Any) -> tuple[tuple[int, int], str] | None:
    """(size, mode) from an image file or bytes without decoding the pixels; None if unreadable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            return img.size, img.mode
    except (OSError, ValueError, SyntaxError):
        return None


class Source:
    """A streaming data source. ``geometry`` is set by :meth:`profile` for image data."""

    geometry: Geometry | None = None

    def profile(self, known: dict[str, Any] | None) -> Profile:
        """First pass; ``known`` is the schema's features (None on a first ingest)."""
        raise NotImplementedError

    def records(self, kinds: dict[str, str]) -> Iterator[Record | BadRecord]:
        raise NotImplementedError


def open_source(cfg: DataConfig) -> Source:
    """Pick the reader for ``cfg.source`` (``cfg.format`` or guessed from the path).

    Raises:
        PipelineError: the path does not exist or its format cannot be told.
    """
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


class ImageFolderSource(Source):
    """``ROOT/CLASS/*.{jpg,jpeg,png,bmp,gif}``: the label is the sub-folder's name."""

    def __init__(self, root: Path, cfg: DataConfig):
        self.root = root
        self.cfg = cfg
        if not root.is_dir():
            raise PipelineError(f"data.source: {root} is not a directory of class folders")

    def _files(self) -> Iterator[tuple[str, Path]]:
        for class_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if class_dir.name.startswith("."):
                continue
            for path in sorted(class_dir.rglob("*")):
                if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                    yield class_dir.name, path

    def profile(self, known: dict[str, Any] | None) -> Profile:
        files = [path for _, path in self._files()]
        if not files:
            raise PipelineError(
                f"data.source: {self.root} has no images ({', '.join(IMAGE_EXTENSIONS)}) "
                "in class sub-folders"
            )

        def observe() -> tuple[Counter[tuple[int, int]], Counter[str]]:
            sizes: Counter[tuple[int, int]] = Counter()
            modes: Counter[str] = Counter()
            for path in files:
                header = _image_header(path)
                if header:
                    sizes[header[0]] += 1
                    modes[header[1]] += 1
            return sizes, modes

        self.geometry = resolve_geometry(self.cfg, known, "image", observe)
        return Profile({"image": "image"}, {}, len(files), "string")

    def records(self, kinds: dict[str, str]) -> Iterator[Record | BadRecord]:
        from PIL import Image, UnidentifiedImageError

        assert self.geometry is not None, "profile() first"
        for label, path in self._files():
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


class CsvSource(Source):
    """A CSV file with a header row; the label is ``data.label_column``."""

    def __init__(self, path: Path, cfg: DataConfig):
        self.path = path
        self.label_column = cfg.label_column
        self.key_column = cfg.key_column
        self.delimiter = cfg.csv_delimiter
        self.max_bad_fraction = cfg.max_bad_fraction

    def _reader(self) -> tuple[Any, list[str], Any]:
        # surrogateescape: an invalid byte is kept as a lone surrogate and reported with the
        # line it is on (a strict decoder fails on the whole read-ahead block, "line 1").
        f = open(  # noqa: SIM115 - returned
            self.path, newline="", encoding="utf-8-sig", errors="surrogateescape"
        )
        reader = csv.reader(f, delimiter=self.delimiter)
        try:
            header = next(reader)
        except StopIteration:
            f.close()
            raise PipelineError(f"{self.path}: empty file; a header row is required") from None
        except (csv.Error, UnicodeDecodeError) as e:
            f.close()
            raise PipelineError(f"{self.path}: line 1: cannot read header: {e}") from e
        header = [h.strip() for h in header]
        if any(_undecodable(h) for h in header):
            f.close()
            raise PipelineError(f"{self.path}: line 1: the header is not valid UTF-8")
        if len(header) == 1:
            guess = next((d for d in (";", "\t", "|") if d in header[0]), None)
            if guess is not None:
                f.close()
                raise PipelineError(
                    f"{self.path}: line 1: one column {header[0][:60]!r}: the file looks "
                    f"{guess!r}-delimited; set data.csv_delimiter = {guess!r}"
                )
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes or "" in header:
            f.close()
            raise PipelineError(
                f"{self.path}: line 1: header has "
                + (f"duplicate columns {dupes}" if dupes else "an empty column name")
            )
        if self.label_column not in header:
            f.close()
            raise PipelineError(
                f"{self.path}: line 1: label column {self.label_column!r} not in header "
                f"{header}; set data.label_column"
            )
        if self.key_column and self.key_column not in header:
            f.close()
            raise PipelineError(
                f"{self.path}: line 1: key column {self.key_column!r} not in header {header}"
            )
        return f, header, reader

    def profile(self, known: dict[str, Any] | None) -> Profile:
        """Infer each column's kind: numeric when (nearly) every non-empty value parses.

        A column whose unparsable values stay within ``data.max_bad_fraction`` of its non-empty
        values is still numeric; those rows become bad records in the second pass.
        """
        f, header, reader = self._reader()
        numeric = dict.fromkeys(header, 0)
        other = dict.fromkeys(header, 0)
        lo = dict.fromkeys(header, math.inf)
        hi = dict.fromkeys(header, -math.inf)
        rows = 0
        widths: set[int] = set()
        with f:
            try:
                for row in reader:
                    if not row or len(row) != len(header) or any(_undecodable(v) for v in row):
                        widths.add(len(row))
                        continue
                    rows += 1
                    for name, text in zip(header, row):
                        text = text.strip()
                        if not text:
                            continue
                        value = _parse_float(text)
                        if value is None:
                            other[name] += 1
                        else:
                            numeric[name] += 1
                            if math.isfinite(value):
                                lo[name] = min(lo[name], value)
                                hi[name] = max(hi[name], value)
            except (csv.Error, UnicodeDecodeError) as e:
                raise PipelineError(f"{self.path}: line {reader.line_num}: {e}") from e
        if rows == 0:
            widths.discard(0)
            raise PipelineError(
                f"{self.path}: no data rows after the header"
                + (
                    f": every row has {sorted(widths)} fields, the header {len(header)}; "
                    "check data.csv_delimiter"
                    if widths
                    else ""
                )
            )
        kinds: dict[str, str] = {}
        ranges: dict[str, tuple[float, float]] = {}
        for name in header:
            seen = numeric[name] + other[name]
            is_numeric = seen > 0 and other[name] <= self.max_bad_fraction * seen
            kinds[name] = "float" if is_numeric else "string"
            if is_numeric and lo[name] <= hi[name]:
                ranges[name] = (lo[name], hi[name])
        label_kind = kinds.pop(self.label_column)
        if self.label_column in ranges:
            ranges["__label__"] = ranges.pop(self.label_column)
        if self.key_column:
            kinds.pop(self.key_column, None)
            ranges.pop(self.key_column, None)
        return Profile(kinds, ranges, rows, label_kind)

    def records(self, kinds: dict[str, str]) -> Iterator[Record | BadRecord]:
        f, header, reader = self._reader()
        with f:
            line = 1
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except (csv.Error, UnicodeDecodeError) as e:
                    yield BadRecord(f"{self.path}:{reader.line_num}", str(e))
                    continue
                line = reader.line_num
                origin = f"{self.path}:{line}"
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
                    if not text:
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
                yield Record(key, origin, values[self.label_column] or None, features)


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


class NpzSource(Source):
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

    def profile(self, known: dict[str, Any] | None) -> Profile:
        archive, x, y = self._open()
        with archive:
            if len(x.shape) == 2:
                lo, hi = math.inf, -math.inf
                for chunk in x.chunks(self.CHUNK):
                    finite = chunk[np.isfinite(chunk)] if chunk.dtype.kind == "f" else chunk
                    if finite.size:
                        lo = min(lo, float(finite.min()))
                        hi = max(hi, float(finite.max()))
                ranges = {"x": (lo, hi)} if lo <= hi else {}
                kinds = {"x": "vector"}
            else:
                kinds, ranges = {"image": "image"}, {}
                h, w = x.row_shape[:2]
                c = x.row_shape[2] if len(x.row_shape) == 3 else 1
                self.geometry = resolve_geometry(
                    self.cfg,
                    known,
                    "image",
                    lambda: (Counter({(w, h): 1}), Counter({"L" if c == 1 else "RGB": 1})),
                )
            label_kind = "string" if y.dtype.kind in "biuSUO" else "float"
            return Profile(kinds, ranges, x.shape[0], label_kind)

    def records(self, kinds: dict[str, str]) -> Iterator[Record | BadRecord]:
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


class TFRecordSource(Source):
    """TFRecord files of ``tf.Example`` (GZIP when the name ends in ``.gz``)."""

    def __init__(self, path: Path, cfg: DataConfig):
        self.files = (
            sorted(p for p in path.iterdir() if p.name.lower().endswith(TFRECORD_SUFFIXES))
            if path.is_dir()
            else [path]
        )
        self.cfg = cfg

    def _examples(self) -> Iterator[tuple[str, bytes | None, str]]:
        import tensorflow as tf

        for path in self.files:
            compression = "GZIP" if path.name.lower().endswith(".gz") else ""
            index = 0
            try:
                for raw in tf.data.TFRecordDataset(str(path), compression_type=compression):
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

    def profile(self, known: dict[str, Any] | None) -> Profile:
        kinds: dict[str, str] = {}
        ranges: dict[str, tuple[float, float]] = {}
        sizes: Counter[tuple[int, int]] = Counter()
        modes: Counter[str] = Counter()
        rows = 0
        label_kind = ""
        for _origin, raw, _error in self._examples():
            if raw is None:
                continue
            try:
                feats = self._decode(raw)
            except Exception:  # noqa: BLE001 - a corrupt proto is a bad record in pass two
                continue
            rows += 1
            for name, (kind, values) in feats.items():
                if name == self.cfg.label_column:
                    label_kind = label_kind or ("float" if kind == "float" else "string")
                    continue
                if kind == "bytes":
                    guess = "image" if values and _looks_like_image(values[0]) else "string"
                elif len(values) > 1 or kinds.get(name) == "vector":
                    guess = "vector"
                else:
                    guess = "float"
                kinds.setdefault(name, guess)
                if guess == "image" and sum(sizes.values()) < 10000:
                    header = _image_header(values[0])
                    if header:
                        sizes[header[0]] += 1
                        modes[header[1]] += 1
                if guess in ("float", "vector") and values:
                    lo, hi = ranges.get(name, (math.inf, -math.inf))
                    finite = [v for v in values if math.isfinite(v)]
                    if finite:
                        ranges[name] = (min(lo, min(finite)), max(hi, max(finite)))
        if rows == 0:
            raise PipelineError(f"data.source: no readable tf.Example in {self.cfg.source}")
        if not label_kind:
            raise PipelineError(
                f"data.source: no example has the label feature {self.cfg.label_column!r}"
            )
        images = [n for n, k in kinds.items() if k == "image"]
        if images:
            self.geometry = resolve_geometry(self.cfg, known, images[0], lambda: (sizes, modes))
        return Profile(kinds, ranges, rows, label_kind)

    def records(self, kinds: dict[str, str]) -> Iterator[Record | BadRecord]:
        from PIL import Image

        geometry = self.geometry
        for origin, raw, error in self._examples():
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

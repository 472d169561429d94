"""Real Cell Painting fields: where they are (LoadData tables, microscope folders,
s3://) and how one field becomes a record.

A source is a table of fields (one row per (source, batch, plate, well, site)) with,
per channel, the path of its 16-bit TIFF and optionally of its illumination
function. `FieldSource` reads a row into a record; every source, synthetic and
TFDS included, finishes its field through `finish_field`, so the intensity
normalisation is computed once, in one order, for all of them:

    raw uint16 planes -> / illumination function (float) -> integer downscale
    (block mean) -> uint16 -> intensity bounds of the whole field -> centre crop /
    mirror pad to data.field_size

Unreadable input raises `ReadError` naming the path; the pipeline counts and skips
such fields and never substitutes an image.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import logging
import os
import posixpath
import random
import re
import threading
import time
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from dinocell_jax.config import CHANNELS
from dinocell_jax.data import field_slots

log = logging.getLogger(__name__)

META = ("source", "batch", "plate", "well", "site")


class ReadError(OSError):
    """One field could not be read; the message names the path and the field."""


class DataError(RuntimeError):
    """The data cannot feed a run (bad source spec, too many unreadable fields)."""


# ----------------------------------------------------------------------------- channels


@dataclasses.dataclass(frozen=True)
class Channel:
    """One plane of a field: `name` (stain, LoadData column suffix) and `number` (in file names)."""

    name: str
    number: int | None


def channel_list(data_cfg, *, by_name: bool = False) -> list[Channel]:
    """The planes a field is made of, in output order.

    The 5 stains come in `config.CHANNELS` order (DNA, ER, RNA, AGP, Mito) with
    their numbers from `data.channels` (a stain may be left out of that map);
    extra stains in the map follow by name. Brightfield planes are added only
    when `data.brightfield` names them: channel numbers ("6,7,8") for folder
    sources, LoadData column suffixes ("Brightfield,HighZBF") when `by_name`.
    """
    mapping = {str(k): int(v) for k, v in dict(data_cfg.channels).items()}
    names = [s for s in CHANNELS if s in mapping] + sorted(k for k in mapping if k not in CHANNELS)
    out = [Channel(n, mapping[n]) for n in names]
    numbers = [c.number for c in out]
    if len(set(numbers)) != len(numbers):
        raise DataError(f"data.channels maps two stains to one channel number: {mapping}")
    for item in [s.strip() for s in str(data_cfg.brightfield).split(",") if s.strip()]:
        if item.isdigit():
            if by_name:
                raise DataError(
                    f"data.brightfield: LoadData sources name brightfield planes by column suffix "
                    f"(e.g. 'Brightfield' for FileName_OrigBrightfield), got channel number {item!r}"
                )
            out.append(Channel(f"BF{item}", int(item)))
        else:
            if not by_name:
                raise DataError(f"data.brightfield: folder sources need channel numbers (e.g. '6,7,8'), got {item!r}")
            out.append(Channel(item, None))
    if not out:
        raise DataError("data.channels is empty: no plane to read")
    return out


# ----------------------------------------------------------------------------- storage


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


class FileReader:
    """Reads bytes and arrays from local paths or fsspec URLs (s3://, gs://, http://).

    s3:// goes through s3fs, anonymous by default (the Cell Painting Gallery is a
    public bucket). Remote reads are retried `retries` times with exponential
    backoff and jitter (botocore's and s3fs's own retries are switched off so that
    every attempt is ours and logged); a missing object is not retried. With a
    `cache_dir`, remote files are kept on local disk, least recently used first out,
    within `cache_max_bytes`. Picklable: the filesystem is made lazily in each
    process (grain workers are spawned).
    """

    def __init__(
        self,
        *,
        endpoint_url: str = "",
        anonymous: bool = True,
        retries: int = 4,
        backoff_s: float = 0.5,
        cache_dir: str = "",
        cache_max_bytes: int = 0,
    ):
        self.endpoint_url = endpoint_url or os.environ.get("DINOCELL_S3_ENDPOINT_URL", "")
        self.anonymous = anonymous
        self.retries = max(1, int(retries))
        self.backoff_s = backoff_s
        self.cache_dir = cache_dir
        self.cache_max_bytes = int(cache_max_bytes)
        self.retried = 0  # attempts that failed and were retried, in this process
        self._fs: dict[str, Any] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._written_since_scan = 0

    @classmethod
    def from_config(cls, data_cfg) -> "FileReader":
        return cls(
            endpoint_url=data_cfg.s3_endpoint_url,
            anonymous=data_cfg.s3_anonymous,
            retries=data_cfg.read_retries,
            backoff_s=data_cfg.retry_backoff_s,
            cache_dir=data_cfg.cache_dir,
            cache_max_bytes=int(data_cfg.cache_max_gb * 2**30),
        )

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fs"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def filesystem(self, path: str):
        """The fsspec filesystem of `path` (made once per process and protocol)."""
        import fsspec

        protocol = path.split("://", 1)[0] if _is_remote(path) else "file"
        if self._pid != os.getpid():  # a forked child must not reuse the parent's event loop
            self._fs, self._pid = {}, os.getpid()
        if protocol not in self._fs:
            if protocol in ("s3", "s3a"):
                kwargs: dict[str, Any] = dict(
                    anon=self.anonymous,
                    config_kwargs={"retries": {"total_max_attempts": 1}},
                    skip_instance_cache=True,
                )
                if self.endpoint_url:
                    kwargs["client_kwargs"] = {"endpoint_url": self.endpoint_url}
                fs = fsspec.filesystem("s3", **kwargs)
                fs.retries = 1  # s3fs's own retry loop (a class attribute, not a constructor argument)
                self._fs[protocol] = fs
            else:
                self._fs[protocol] = fsspec.filesystem(protocol)
        return self._fs[protocol]

    def read_bytes(self, path: str) -> bytes:
        """All bytes of `path`; raises ReadError naming it after the last retry."""
        if not _is_remote(path):
            try:
                with open(_local(path), "rb") as f:
                    return f.read()
            except OSError as e:
                raise ReadError(f"cannot read {path}: {e}") from e
        cached = self._cache_path(path)
        if cached and os.path.exists(cached):
            try:
                with open(cached, "rb") as f:
                    data = f.read()
                os.utime(cached)
                return data
            except OSError:
                pass  # evicted by another worker between exists() and open()
        data = self._fetch(path)
        if cached:
            self._cache_put(cached, data)
        return data

    def _fetch(self, path: str) -> bytes:
        last: Exception | None = None
        for attempt in range(self.retries):
            try:
                return self.filesystem(path).cat_file(path)
            except (FileNotFoundError, PermissionError) as e:
                raise ReadError(f"cannot read {path}: {type(e).__name__}: {e}") from e
            except Exception as e:  # network and server errors: worth another try
                last = e
                if attempt + 1 < self.retries:
                    self.retried += 1
                    wait = self.backoff_s * 2**attempt * (0.5 + random.random())
                    log.warning("read of %s failed (%s: %s); retry %d/%d in %.2fs",
                                path, type(e).__name__, e, attempt + 1, self.retries - 1, wait)
                    time.sleep(wait)
        raise ReadError(f"cannot read {path} after {self.retries} attempts: {type(last).__name__}: {last}")

    def _cache_path(self, path: str) -> str:
        if not self.cache_dir or self.cache_max_bytes <= 0:
            return ""
        digest = hashlib.sha1(path.encode()).hexdigest()
        return os.path.join(self.cache_dir, digest[:2], digest + os.path.splitext(path)[1])

    def _cache_put(self, cached: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = f"{cached}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, cached)  # atomic: concurrent workers never see half a file
        with self._lock:
            self._written_since_scan += len(data)
            # Scanning the cache costs a directory walk; do it when a tenth of the
            # budget may have been added since the last one.
            if self._written_since_scan < self.cache_max_bytes // 10:
                return
            self._written_since_scan = 0
        self.evict()

    def evict(self) -> int:
        """Deletes least recently used cache files until within the budget; returns bytes freed."""
        entries = []
        for dirpath, _, files in os.walk(self.cache_dir):
            for name in files:
                p = os.path.join(dirpath, name)
                try:
                    st = os.stat(p)
                except FileNotFoundError:
                    continue
                entries.append((st.st_mtime, st.st_size, p))
        total, freed = sum(e[1] for e in entries), 0
        for _, size, p in sorted(entries):
            if total - freed <= self.cache_max_bytes:
                break
            try:
                os.remove(p)
                freed += size
            except FileNotFoundError:
                pass
        return freed

    def read_image(self, path: str) -> np.ndarray:
        """One plane of a 16-bit TIFF at full depth -> [H, W] (dtype of the file)."""
        import tifffile

        try:
            if _is_remote(path):
                image = tifffile.imread(io.BytesIO(self.read_bytes(path)))
            else:
                image = tifffile.imread(_local(path))
        except ReadError:
            raise
        except Exception as e:  # tifffile raises ValueError/TiffFileError/struct.error on bad files
            raise ReadError(f"cannot decode TIFF {path}: {type(e).__name__}: {e}") from e
        image = np.asarray(image)
        if image.ndim == 3 and 1 in (image.shape[0], image.shape[-1]):
            image = image.reshape(image.shape[:2] if image.shape[-1] == 1 else image.shape[1:])
        if image.ndim != 2:
            raise ReadError(f"{path}: expected one 2-D plane, got an image of shape {image.shape}")
        if not np.issubdtype(image.dtype, np.integer) and not np.issubdtype(image.dtype, np.floating):
            raise ReadError(f"{path}: unsupported pixel type {image.dtype}")
        return image

    def read_npy(self, path: str) -> np.ndarray:
        try:
            if _is_remote(path):
                return np.load(io.BytesIO(self.read_bytes(path)), allow_pickle=False)
            return np.load(_local(path), allow_pickle=False)
        except ReadError:
            raise
        except Exception as e:
            raise ReadError(f"cannot read illumination function {path}: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------- field finishing


def _to_uint16(plane: np.ndarray) -> np.ndarray:
    """Float plane -> uint16, rounding; scaled down only if it would overflow.

    JUMP's illumination functions are rescaled to >= 1, so raw / illum fits the
    16-bit range and is kept as is; a plane that would not fit is scaled as a
    whole, which the per-image normalisation that follows cannot see.
    """
    peak = float(np.max(plane)) if plane.size else 0.0
    rounded = np.rint(plane * (65535.0 / peak) if peak > 65535.0 else plane)
    return np.clip(rounded, 0, 65535, out=rounded).astype(np.uint16)


def downscaled_shape(shape: tuple[int, int, int], factor: int) -> tuple[int, int, int]:
    """[C, H, W] -> [C, H // f, W // f]; a ReadError naming the shape when nothing would be left."""
    c, h, w = shape
    if factor > 1 and (h < factor or w < factor):
        raise ReadError(f"field of shape {tuple(shape)} is smaller than data.downscale={factor}")
    return c, h // factor, w // factor


def downscale(field: np.ndarray, factor: int) -> np.ndarray:
    """Block mean by an integer factor: [C, H, W] -> [C, H // f, W // f] float (edge rows that do not fill a block are dropped).

    Sums strided views (a reduction over the split axes of a reshape is several
    times slower in numpy). Integer fields accumulate in float32, exact while
    f^2 x 65535 < 2^24 (f <= 16); float fields (illumination-corrected) in float64.
    """
    if factor <= 1:
        return field
    c, hh, ww = downscaled_shape(field.shape, factor)
    exact32 = field.dtype.kind in "ui" and factor <= 16
    out = np.zeros((c, hh, ww), np.float32 if exact32 else np.float64)
    for a in range(factor):
        for b in range(factor):
            out += field[:, a: hh * factor: factor, b: ww * factor: factor]
    out /= factor * factor
    return out


def crop_or_pad(field: np.ndarray, size: int) -> np.ndarray:
    """Centre crop or mirror pad [C, H, W] -> [C, size, size].

    Padding mirrors the field rather than adding zeros: black borders would look
    like empty wells to the crops and to the intensity bounds.
    """
    _, h, w = field.shape
    if h > size:
        top = (h - size) // 2
        field = field[:, top: top + size]
    if w > size:
        left = (w - size) // 2
        field = field[:, :, left: left + size]
    _, h, w = field.shape
    if h < size or w < size:
        ph, pw = size - h, size - w
        field = np.pad(field, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), mode="symmetric")
    # A field already of the size comes back as it is (a worker's shared-memory field stays one).
    return field if field.flags.c_contiguous else np.ascontiguousarray(field)


# Illumination correction divides in float32: half the memory traffic of float64 and
# twice the values per vector instruction (1.0 against 2.3 ms a 1080 px plane, one
# core). A raw count is exact in float32 and the quotient is within 6e-8 of float64's,
# so only a quotient within ~4e-3 of a half rounds differently: one count off, in
# ~1e-4 of the pixels, far below a camera's noise.
CORRECTION_DTYPE = np.float32


def _corrected_plane(raw: np.ndarray, illum: np.ndarray, factor: int, out: np.ndarray) -> None:
    """out[:] = `_to_uint16(downscale(raw / illum, factor))` in CORRECTION_DTYPE, one block of rows at a time.

    The same arithmetic on each value, so the same result to the bit; but a 1080 px
    plane never has its float copies (4.7 MB each) written out to memory,
    which made this path the workers' largest cost and their memory traffic the
    limit of many workers together. The blocks go straight into `out` (a plane of
    the finished field): no plane-sized temporary to fault in and copy. Only a plane
    that does not fit 16 bits (its peak is known at the end) takes the whole-plane
    path, to be scaled as a whole.
    """
    hh = raw.shape[0] // factor
    rows = max(1, 64 // factor) * factor  # ~0.3 MB of float32 per block at 1080 px: stays in cache
    # An unsigned plane over a positive illumination function (checked when it is read)
    # has no negative quotient: the floor of _to_uint16's clip, a pass as dear as the
    # division, is needed only for signed or float planes.
    may_be_negative = raw.dtype.kind != "u"
    peak = 0.0
    for top in range(0, hh * factor, rows):
        bottom = min(top + rows, hh * factor)
        block = np.divide(raw[top:bottom], illum[top:bottom], dtype=CORRECTION_DTYPE)
        if factor > 1:
            block = downscale(block[None], factor)[0]
        if block.size:
            peak = max(peak, float(block.max()))
        np.rint(block, out=block)
        if may_be_negative:
            np.maximum(block, 0, out=block)
        # Below 2^16 (else the whole-plane path below) the cast is exact.
        out[top // factor: bottom // factor] = block
    if peak > 65535.0:
        out[:] = _to_uint16(downscale(np.divide(raw, illum, dtype=CORRECTION_DTYPE)[None], factor)[0])


def finish_field(field, data_cfg, illumination=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The one host-side path of every field.

    Args:
      field: [C, H, W] uint16 (raw) or float (after illumination correction), or a
        list of C such [H, W] planes of one shape (finished plane by plane, so a
        float field is never held whole).
      data_cfg: `config.data` (downscale, field_size, normalization, percentile_low/high).
      illumination: None, or per channel the float illumination function [H, W] that
        the raw plane is divided by (None for a channel without one).
    Returns:
      field uint16 [C, S, S] with S = data.field_size, norm_low and norm_high
      float32 [C]: bounds computed on the whole (downscaled) field, before cropping.
    """
    from dinocell_jax.data.normalize import intensity_bounds

    if len(field) == 0:
        raise ReadError("a field with no channel")
    factor, size = max(1, int(data_cfg.downscale)), int(data_cfg.field_size)
    illumination = [None] * len(field) if illumination is None else illumination
    shape = downscaled_shape((len(field), *field[0].shape), factor)
    # In a grain worker a field that needs no crop or pad is written straight into the
    # shared-memory slot the trainer reads it from (field_slots; any other is copied
    # into one when handed off).
    out = (field_slots.new_array if shape[1:] == (size, size) else np.empty)(shape, np.uint16)
    for c, (plane, illum) in enumerate(zip(field, illumination)):
        if illum is not None:
            _corrected_plane(plane, illum, factor, out[c])
            continue
        if factor > 1:
            plane = downscale(plane[None], factor)[0]
        if plane.dtype != np.uint16:
            plane = _to_uint16(plane) if np.issubdtype(plane.dtype, np.floating) else np.clip(plane, 0, 65535).astype(np.uint16)
        out[c] = plane
    low, high = intensity_bounds(out, data_cfg.normalization, data_cfg.percentile_low, data_cfg.percentile_high)
    out = crop_or_pad(out, size)
    return out, np.asarray(low, np.float32), np.asarray(high, np.float32)


# ----------------------------------------------------------------------------- field tables


def natural_key(text: str) -> tuple:
    """Sort key with digit runs as numbers: 'ch10' after 'ch9', site '10' after '9'."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(text)))


def _sorted_table(rows: list[dict], n_channels: int) -> pd.DataFrame:
    columns = list(META) + [f"file{j}" for j in range(n_channels)] + [f"illum{j}" for j in range(n_channels)]
    rows = sorted(rows, key=lambda r: tuple(natural_key(r[k]) for k in META))
    table = pd.DataFrame(rows, columns=columns)
    for k in columns:
        table[k] = table[k].fillna("").astype(str)
    for k in ("source", "batch", "plate") + tuple(f"illum{j}" for j in range(n_channels)):
        table[k] = table[k].astype("category")  # few distinct values over millions of rows
    return table


def parse_path_remap(spec: str) -> list[tuple[str, str]]:
    """'FROM=TO;FROM2=TO2' -> [(FROM, TO), ...]: re-roots paths of a LoadData table on a local copy."""
    pairs = []
    for item in [s for s in str(spec).split(";") if s.strip()]:
        if "=" not in item:
            raise DataError(f"data.path_remap: {item!r} is not FROM=TO")
        a, b = item.split("=", 1)
        pairs.append((a.strip(), b.strip()))
    return pairs


def _remap(path: str, pairs: Sequence[tuple[str, str]]) -> str:
    for a, b in pairs:
        if path.startswith(a):
            return b + path[len(a):]
    return path


def _join_plain(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name if _is_remote(directory) else os.path.join(_local(directory), name)


def _join(directory: str, name: str, base: str) -> str:
    """PathName + FileName as JUMP writes them; relative folders are taken from `base`."""
    if not name:
        return ""
    if _is_remote(name) or os.path.isabs(_local(name)):
        return name if _is_remote(name) else _local(name)
    if not directory:
        directory = base
    elif not (_is_remote(directory) or os.path.isabs(_local(directory))):
        directory = _join_plain(base, directory)
    return _join_plain(directory, name)


_LOADDATA_PREFERENCE = ("load_data_with_illum.parquet", "load_data_with_illum.csv", "load_data.parquet", "load_data.csv")


def find_loaddata_files(spec: str, reader: FileReader) -> list[str]:
    """The LoadData tables a `loaddata:` spec names.

    A file, a comma-separated list, a glob, or a directory (JUMP's
    `workspace/load_data_csv/<batch>/` tree): in each folder of a directory the
    table with illumination columns is preferred (parquet before csv).
    """
    out: list[str] = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        fs = reader.filesystem(item)
        proto = item.split("://", 1)[0] + "://" if _is_remote(item) else ""
        if any(ch in item for ch in "*?["):
            found = sorted(fs.glob(item))
            if not found:
                raise DataError(f"data.source loaddata: no file matches {item}")
            out += [proto + f if proto and not f.startswith(proto) else f for f in found]
        elif item.endswith((".csv", ".csv.gz", ".parquet")):
            out.append(item)  # no listing needed: a missing table fails at read time with its path
        elif fs.isdir(item):
            by_dir: dict[str, dict[str, str]] = collections.defaultdict(dict)
            for f in fs.find(item):
                by_dir[posixpath.dirname(f)][posixpath.basename(f)] = f
            picked = []
            for d in sorted(by_dir, key=natural_key):
                for name in _LOADDATA_PREFERENCE:
                    if name in by_dir[d]:
                        f = by_dir[d][name]
                        picked.append(proto + f if proto and not f.startswith(proto) else f)
                        break
            if not picked:
                raise DataError(f"data.source loaddata: no load_data*.csv|parquet under {item}")
            out += picked
        elif fs.exists(item):
            out.append(item)
        else:
            raise DataError(f"data.source loaddata: {item} does not exist")
    return out


def _read_table(path: str, reader: FileReader) -> pd.DataFrame:
    data = io.BytesIO(reader.read_bytes(path))
    try:
        if path.endswith(".parquet"):
            table = pd.read_parquet(data)
            # Parquet may type Site or Plate as numbers; all metadata are strings here.
            for k in table.columns:
                col = table[k]
                if pd.api.types.is_float_dtype(col) and col.dropna().apply(float.is_integer).all():
                    col = col.astype("Int64")
                table[k] = col.astype(str).where(col.notna(), "")
            return table
        return pd.read_csv(data, dtype=str, keep_default_na=False, compression="infer" if not path.endswith(".gz") else "gzip")
    except Exception as e:
        raise DataError(f"cannot parse LoadData table {path}: {type(e).__name__}: {e}") from e


def read_loaddata(spec: str, channels: Sequence[Channel], reader: FileReader, *,
                  illumination: bool = True, path_remap: str = "") -> pd.DataFrame:
    """Field table from JUMP LoadData tables.

    Columns `FileName_Orig<Ch>` + `PathName_Orig<Ch>` or `URL_Orig<Ch>` per
    channel, `Metadata_Plate`, `Metadata_Well`, `Metadata_Site` (required),
    `Metadata_Source`, `Metadata_Batch` (optional), all read as strings; with
    `illumination`, `FileName_Illum<Ch>` + `PathName_Illum<Ch>` where present.
    Relative PathNames are relative to the table's folder.
    """
    pairs = parse_path_remap(path_remap)
    rows: list[dict] = []
    for path in find_loaddata_files(spec, reader):
        table = _read_table(path, reader)
        base = posixpath.dirname(path) if _is_remote(path) else os.path.dirname(os.path.abspath(_local(path)))
        missing = [k for k in ("Metadata_Plate", "Metadata_Well", "Metadata_Site") if k not in table.columns]
        if missing:
            raise DataError(f"LoadData table {path} lacks column(s) {missing}")
        files = []
        for ch in channels:
            if f"URL_Orig{ch.name}" in table.columns:
                col = table[f"URL_Orig{ch.name}"]
                files.append([_remap(_join("", u, base), pairs) for u in col])
            elif f"FileName_Orig{ch.name}" in table.columns and f"PathName_Orig{ch.name}" in table.columns:
                files.append([_remap(_join(d, n, base), pairs)
                              for d, n in zip(table[f"PathName_Orig{ch.name}"], table[f"FileName_Orig{ch.name}"])])
            else:
                raise DataError(
                    f"LoadData table {path} has no column URL_Orig{ch.name} nor FileName_Orig{ch.name} + "
                    f"PathName_Orig{ch.name} (channel {ch.name}); columns: {sorted(table.columns)}"
                )
        illums = []
        for ch in channels:
            if illumination and f"FileName_Illum{ch.name}" in table.columns:
                dirs = table.get(f"PathName_Illum{ch.name}", pd.Series([""] * len(table)))
                illums.append([_remap(_join(d, n, base), pairs) for d, n in zip(dirs, table[f"FileName_Illum{ch.name}"])])
            else:
                illums.append([""] * len(table))
        for i in range(len(table)):
            row = {
                "source": table["Metadata_Source"].iat[i] if "Metadata_Source" in table.columns else "",
                "batch": table["Metadata_Batch"].iat[i] if "Metadata_Batch" in table.columns else "",
                "plate": table["Metadata_Plate"].iat[i],
                "well": table["Metadata_Well"].iat[i],
                "site": table["Metadata_Site"].iat[i],
            }
            for j in range(len(channels)):
                row[f"file{j}"] = files[j][i]
                row[f"illum{j}"] = illums[j][i]
            rows.append(row)
    if not rows:
        raise DataError(f"data.source loaddata:{spec}: the tables list no field")
    return _sorted_table(rows, len(channels))


# Phenix / Operetta: r01c01f01p01-ch1sk1fk1fl1.tiff
_PHENIX = re.compile(r"^r(?P<row>\d+)c(?P<col>\d+)f(?P<site>\d+)p(?P<plane>\d+)-ch(?P<ch>\d+)sk(?P<time>\d+)fk\d+fl\d+\.tiff?$", re.I)
# ImageXpress: <prefix>_<well>_s<site>_w<N><GUID>.tif; the GUID (36 with dashes or 32 hex) is
# optional, so the lazy channel digits stop where a whole GUID begins (w10 stays channel 10).
_IMAGEXPRESS = re.compile(
    r"^(?P<prefix>.+)_(?P<well>[A-Za-z]{1,2}\d{2})_s(?P<site>\d+)_w(?P<ch>\d+?)"
    r"(?P<id>[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}|[0-9A-Fa-f]{32})?\.tiff?$")
# Yokogawa CV8000: <plate>_<well>_T0001F001L01A01Z01C01.tif
_CV8000 = re.compile(
    r"^(?P<plate>.+)_(?P<well>[A-Za-z]{1,2}\d{2})_T(?P<time>\d+)F(?P<site>\d+)L\d+A\d+Z(?P<plane>\d+)C(?P<ch>\d+)\.tiff?$")


@dataclasses.dataclass(frozen=True)
class ParsedName:
    """What a microscope file name says: `extra` holds z-plane/time-point when not the first."""

    scheme: str
    well: str
    site: str
    channel: int
    plate: str = ""
    extra: str = ""


def _row_letters(row: int) -> str:
    """1 -> A, 26 -> Z, 27 -> AA (1536-well plates have 32 rows)."""
    out = ""
    while row > 0:
        row, rem = divmod(row - 1, 26)
        out = chr(ord("A") + rem) + out
    return out


def _extra(**parts: str) -> str:
    return "".join(f"-{k}{int(v)}" for k, v in parts.items() if v is not None and int(v) != 1)


def parse_image_name(name: str) -> ParsedName | None:
    """Parses a Phenix/Operetta, ImageXpress or CV8000 file name; None for anything else."""
    if "thumb" in name.lower():
        return None
    if m := _PHENIX.match(name):
        well = f"{_row_letters(int(m['row']))}{int(m['col']):02d}"
        return ParsedName("phenix", well, str(int(m["site"])), int(m["ch"]),
                          extra=_extra(p=m["plane"], t=m["time"]))
    if m := _CV8000.match(name):
        return ParsedName("cv8000", m["well"].upper(), str(int(m["site"])), int(m["ch"]), plate=m["plate"],
                          extra=_extra(z=m["plane"], t=m["time"]))
    if m := _IMAGEXPRESS.match(name):
        return ParsedName("imagexpress", m["well"].upper(), str(int(m["site"])), int(m["ch"]))
    return None


def _plate_and_batch(directory: str) -> tuple[str, str]:
    """JUMP layout `<batch>/images/<plate-dir>/[Images/]file`; plate = plate-dir before '__'."""
    parts = [p for p in directory.replace("\\", "/").split("/") if p]
    if parts and parts[-1].lower() == "images":
        parts = parts[:-1]
    plate_dir = parts[-1] if parts else ""
    rest = parts[:-1]
    if rest and rest[-1].lower() == "images":
        rest = rest[:-1]
    return plate_dir.split("__")[0], (rest[-1] if rest else "")


def scan_folder(root: str, channels: Sequence[Channel], reader: FileReader) -> pd.DataFrame:
    """Field table from a folder of microscope exports (recursively).

    Files are grouped by (batch, plate, well, site) and each plane is put in place by
    the channel number parsed from its name (never by sorted file name). A field
    that lacks a wanted channel stays in the table with no path for it, so that
    reading it fails, is counted and is logged like any other bad input.
    """
    fs = reader.filesystem(root)
    proto = root.split("://", 1)[0] + "://" if _is_remote(root) else ""
    if not fs.isdir(root):
        raise DataError(f"data.source folder: {root} is not a directory")
    want = {ch.number: j for j, ch in enumerate(channels)}
    groups: dict[tuple, dict] = {}
    duplicates = 0
    for f in sorted(fs.find(root)):
        parsed = parse_image_name(posixpath.basename(f))
        if parsed is None:
            continue
        directory = posixpath.dirname(f)
        plate, batch = _plate_and_batch(directory)
        plate = parsed.plate or plate
        src = next((p for p in f.split("/") if re.fullmatch(r"source_\d+", p)), "")
        site = parsed.site + parsed.extra
        key = (src, batch, plate, parsed.well, site)
        row = groups.setdefault(key, dict(zip(META, key)))
        j = want.get(parsed.channel)
        if j is None:
            continue
        path = proto + f if proto and not f.startswith(proto) else f
        if f"file{j}" in row:
            duplicates += 1
            continue
        row[f"file{j}"] = path
    if not groups:
        raise DataError(f"data.source folder:{root}: no Phenix, ImageXpress or CV8000 image file found")
    if duplicates:
        log.warning("folder %s: %d files repeat a (plate, well, site, channel) already seen; the first (sorted) is used",
                    root, duplicates)
    rows = []
    for row in groups.values():
        for j in range(len(channels)):
            row.setdefault(f"file{j}", "")
            row[f"illum{j}"] = ""
        rows.append(row)
    return _sorted_table(rows, len(channels))


# ----------------------------------------------------------------------------- the field source


class FieldSource:
    """Random access to the fields of a table: `len`, `source[i] -> record`.

    Record: `field` uint16 [C, S, S], `norm_low`/`norm_high` float32 [C], `label`
    int (-1 unknown), `source`, `batch`, `plate`, `well`, `site` str. Raises
    ReadError naming the path when a field cannot be read.
    """

    def __init__(self, table: pd.DataFrame, channels: Sequence[Channel], data_cfg, reader: FileReader,
                 labels: np.ndarray | None = None):
        self.table = table.reset_index(drop=True)
        self.channels = list(channels)
        self.data_cfg = data_cfg
        self.reader = reader
        self.labels = np.full(len(table), -1, np.int32) if labels is None else np.asarray(labels, np.int32)
        self._illum_cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_illum_cache"] = collections.OrderedDict()
        return state

    def __len__(self) -> int:
        return len(self.table)

    def describe(self, i: int) -> str:
        t = self.table
        return "/".join(f"{k}={t[k].iat[i]}" for k in META if t[k].iat[i])

    def _illum(self, path: str) -> np.ndarray:
        # One plate's 5 functions serve all its fields: keep the last few plates'.
        if path in self._illum_cache:
            self._illum_cache.move_to_end(path)
            return self._illum_cache[path]
        illum = np.asarray(self.reader.read_npy(path), CORRECTION_DTYPE)  # float64 on disk
        if illum.ndim == 3 and 1 in illum.shape:
            illum = illum.reshape([s for s in illum.shape if s != 1])
        if not np.all(np.isfinite(illum)) or np.any(illum <= 0):
            raise ReadError(f"illumination function {path} has non-positive or non-finite values")
        self._illum_cache[path] = illum
        while len(self._illum_cache) > 4 * len(self.channels):
            self._illum_cache.popitem(last=False)
        return illum

    def __getitem__(self, i: int) -> dict:
        t = self.table
        i = int(i)
        planes, illums, paths = [], [], []
        for j, ch in enumerate(self.channels):
            path = t[f"file{j}"].iat[i]
            if not path:
                number = f" (channel {ch.number})" if ch.number is not None else ""
                others = [t[f"file{k}"].iat[i] for k in range(len(self.channels)) if t[f"file{k}"].iat[i]]
                where = f" beside {others[0]}" if others else ""
                raise ReadError(f"missing channel {ch.name}{number} for field {self.describe(i)}{where}")
            plane = self.reader.read_image(path)
            illum_path = t[f"illum{j}"].iat[i]
            illum = None
            if illum_path:
                illum = self._illum(illum_path)
                if illum.shape != plane.shape:
                    raise ReadError(f"illumination function {illum_path} has shape {illum.shape}, image {path} has {plane.shape}")
            else:
                plane = _plane_to_uint16(plane, path)
            planes.append(plane)
            illums.append(illum)
            paths.append(path)
        shapes = {p.shape for p in planes}
        if len(shapes) != 1:
            detail = ", ".join(f"{p} {a.shape}" for p, a in zip(paths, planes))
            raise ReadError(f"channels of field {self.describe(i)} differ in shape: {detail}")
        field, low, high = finish_field(planes, self.data_cfg, illums)
        record = {"field": field, "norm_low": low, "norm_high": high, "label": int(self.labels[i])}
        for k in META:
            record[k] = str(t[k].iat[i])
        return record


def _plane_to_uint16(plane: np.ndarray, path: str) -> np.ndarray:
    if plane.dtype == np.uint16:
        return plane
    if np.issubdtype(plane.dtype, np.integer):
        if plane.min(initial=0) < 0 or plane.max(initial=0) > 65535:
            raise ReadError(f"{path}: {plane.dtype} values outside the 16-bit range")
        return plane.astype(np.uint16)
    return _to_uint16(plane)


# ----------------------------------------------------------------------------- held-out split


def _stable_rank(keys: Iterable[str]) -> list[str]:
    return sorted(keys, key=lambda k: hashlib.sha1(k.encode()).hexdigest())


def holdout_mask(meta: pd.DataFrame, fraction: float, by: str) -> np.ndarray:
    """bool [N]: which fields are held out.

    `by` = "plate": round(fraction x plates) plates (at least one when fraction > 0),
    chosen by a hash of their names, so the split does not depend on the seed, on
    the order of the tables, or on plates added later. With a single plate (or
    `by` = "well") wells are held out the same way.
    """
    n = len(meta)
    if fraction <= 0 or n == 0:
        return np.zeros(n, bool)
    if by not in ("plate", "well"):
        raise DataError(f"data.holdout_by: {by!r} is not 'plate' or 'well'")
    plates = meta["plate"].astype(str)
    if by == "plate" and plates.nunique() > 1:
        keys = (meta["source"].astype(str) + "/" + meta["batch"].astype(str) + "/" + plates).to_numpy()
    else:
        keys = (meta["source"].astype(str) + "/" + meta["batch"].astype(str) + "/" + plates + "/" + meta["well"].astype(str)).to_numpy()
    unique = _stable_rank(set(keys))
    k = min(len(unique) - 1, max(1, round(fraction * len(unique))))
    if k <= 0:
        log.warning("data.holdout=%s: only one %s, nothing held out", fraction, by)
        return np.zeros(n, bool)
    held = set(unique[:k])
    return np.fromiter((key in held for key in keys), bool, count=n)

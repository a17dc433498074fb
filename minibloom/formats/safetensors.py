"""A small, strict safetensors reader: memory-mapped, BF16-aware, never pickle.

Format (https://github.com/huggingface/safetensors, README "Format"): 8 bytes little-endian u64 ``N``, then ``N`` bytes
of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the byte
buffer, which the tensors must tile exactly. ``safetensors.numpy`` rejects BF16, so we read the header ourselves and
check every dtype, shape and byte range before any data is touched.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

from ..backend import empty_private
from ..errors import MinibloomError
from ..jsonfile import parse_json
from .widen import check_finite, widen, widen_into

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit
# bloom-176b holds under a thousand tensors, a 4-bit bitsandbytes one a few thousand: a header listing more is forged,
# and refusing it by a byte count before parsing keeps a million-entry header from minutes of JSON work
MAX_TENSORS = 1 << 16
MAX_DIMS, MAX_DIM = 8, 1 << 40  # no BLOOM tensor comes near; bounds what a zero-byte tensor may claim
DTYPES = {  # safetensors code -> (numpy storage dtype, itemsize)
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
_CHUNK_BYTES = 32 * 1024 * 1024  # convert big tensors in pieces so RSS never holds a second full copy


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def parse_header(raw: bytes, file_size: int, path: str = "<bytes>") -> tuple[dict[str, TensorInfo], dict]:
    """Validate a safetensors header. ``raw`` is at least the first 8 + N bytes of the file (or all of it)."""
    if file_size < 8 or len(raw) < 8:
        raise MinibloomError(f"{path}: not a safetensors file (only {file_size} bytes; need an 8-byte header length)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER_BYTES:
        raise MinibloomError(f"{path}: header length {n} is over the {MAX_HEADER_BYTES}-byte limit (corrupt file?)")
    if 8 + n > file_size:
        raise MinibloomError(f"{path}: header length {n} runs past the end of the {file_size}-byte file (truncated?)")
    if len(raw) < 8 + n:
        raise MinibloomError(f"{path}: truncated header ({len(raw) - 8} of {n} bytes)")
    text = bytes(raw[8:8 + n])
    if not text.startswith(b"{"):
        raise MinibloomError(f"{path}: header is not valid JSON (does not start with '{{')")
    if text.count(b'"data_offsets"') > MAX_TENSORS:  # every entry has one (an upper bound before parsing)
        raise MinibloomError(f"{path}: header lists more than {MAX_TENSORS} tensors (no BLOOM checkpoint has so many)")
    header = parse_json(text, f"{path}: header", max_bytes=MAX_HEADER_BYTES)
    if not isinstance(header, dict):
        raise MinibloomError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise MinibloomError(f"{path}: __metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise MinibloomError(f"{path}: header lists {len(header)} tensors, more than {MAX_TENSORS} (no BLOOM "
                             "checkpoint has so many)")
    data_start, data_len = 8 + n, file_size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise MinibloomError(f"{where}: entry is not an object")
        dt, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dt, str) or dt not in DTYPES:
            raise MinibloomError(f"{where}: unknown dtype {dt!r} (known: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
            raise MinibloomError(f"{where}: shape must be a list of integers, got {shape!r}")
        if any(s < 0 for s in shape):
            raise MinibloomError(f"{where}: negative dimension in shape {shape}")
        if len(shape) > MAX_DIMS or any(s > MAX_DIM for s in shape):
            raise MinibloomError(f"{where}: shape {shape} has more than {MAX_DIMS} dimensions or one over {MAX_DIM}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise MinibloomError(f"{where}: data_offsets must be [begin, end] integers, got {offs!r}")
        b, e = offs
        if b < 0 or e < b:
            raise MinibloomError(f"{where}: data_offsets {offs} are negative or reversed")
        if e > data_len:
            raise MinibloomError(f"{where}: data_offsets {offs} run past the end of the data ({data_len} bytes)")
        want = DTYPES[dt].itemsize
        for s in shape:
            want *= s
        if want != e - b:
            raise MinibloomError(f"{where}: shape {shape} x {dt} needs {want} bytes but data_offsets span {e - b}")
        infos[name] = TensorInfo(name, dt, tuple(shape), data_start + b, data_start + e)
    # the tensors must tile the data buffer: no overlaps, no holes, nothing trailing
    pos = data_start
    for info in sorted(infos.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != pos:
            what = "overlaps the previous tensor" if info.begin < pos else "leaves a hole before it"
            raise MinibloomError(f"{path}: tensor {info.name!r} {what} (offset {info.begin - data_start}, "
                                 f"expected {pos - data_start})")
        pos = info.end
    if pos != file_size:
        raise MinibloomError(f"{path}: {file_size - pos} bytes after the last tensor are not described by the header")
    return infos, meta


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    """BF16 bit patterns (uint16) -> float32, exactly: bf16 is the top half of an IEEE float32 (``widen``)."""
    return widen(np.asarray(u16, np.uint16), "BF16", np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Values -> BF16 bit patterns (uint16), rounded to nearest even as torch's ``.to(torch.bfloat16)`` does: add
    0x7FFF plus the lowest kept bit, then drop the low 16 bits. Finite values past the largest bfloat16 become inf; NaN
    stays NaN (quiet), including the negative NaNs whose sum would wrap around 32 bits."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    bits = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        bits[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return bits


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to the nearest bfloat16 (``f32_to_bf16``), as float32 of the same shape."""
    return bf16_to_f32(f32_to_bf16(x)).reshape(np.shape(x))


class SafetensorsFile:
    """One memory-mapped ``.safetensors`` file: ``names``, ``info(name)``, ``get(name, dtype)``.

    ``get`` returns a read-only zero-copy view when the stored dtype is the requested one, otherwise a fresh array
    converted piece by piece (the mapped pages are released as it goes, so RSS holds one copy of the weights).
    """

    def __init__(self, path: str | os.PathLike):
        from ..textfile import check_regular

        self.path = check_regular(path)  # a FIFO would block open(), a device never ends
        try:
            self._f = open(self.path, "rb")
        except OSError as e:
            raise MinibloomError(f"{self.path}: cannot open ({e.strerror or e})") from None
        size = os.fstat(self._f.fileno()).st_size
        head = self._f.read(8)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            if n <= MAX_HEADER_BYTES and 8 + n <= size:
                head += self._f.read(n)
        try:
            self.tensors, self.metadata = parse_header(head, size, self.path)
        except MinibloomError:
            self._f.close()
            raise
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise MinibloomError(f"{self.path}: no tensor named {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes as a read-only array of the storage dtype (BF16 as uint16), zero copy."""
        t = self.info(name)
        count = t.nbytes // DTYPES[t.dtype].itemsize
        if count == 0:
            return np.zeros(t.shape, DTYPES[t.dtype])
        return np.frombuffer(self._mm, DTYPES[t.dtype], count, t.begin).reshape(t.shape)

    def get(self, name: str, dtype=None, where: str | None = None) -> np.ndarray:
        """Tensor ``name`` as ``dtype`` (default: float32 for BF16, else the stored dtype), in fresh memory.

        The bytes are read (``preadv``) straight from the page cache into a new array, converting in 32 MiB pieces, so
        RSS never holds a second copy of the weights. Fresh anonymous memory, unlike a file mapping, can be backed by
        huge pages, and a decode step streams every weight once, so page size shows in decode speed. ``raw()`` gives
        the zero-copy mapped view instead. float16/bfloat16 widened to float32/float64 are read from the mapping
        instead and widened in place (``widen``), the mapped pages released piece by piece.

        ``where``: check that every value is finite (a MinibloomError naming ``where`` otherwise); 16-bit tensors
        are checked while they are widened, block by block, others afterwards (``check_finite``).
        """
        t = self.info(name)
        store = DTYPES[t.dtype]
        if dtype is None:
            dtype = np.float32 if t.dtype == "BF16" else store
        dtype = np.dtype(dtype)
        if t.dtype == "BF16" and dtype.kind != "f":
            raise MinibloomError(f"{self.path}: tensor {name!r} is BF16 and cannot become {dtype}")
        out = empty_private(t.shape, dtype)
        flat = out.reshape(-1)
        if t.dtype in ("F16", "BF16") and dtype in (np.float32, np.float64) and flat.size:
            src = self.raw(name).reshape(-1)
            step = _CHUNK_BYTES // 2
            for i in range(0, flat.size, step):
                j = min(flat.size, i + step)
                widen_into(src[i:j], t.dtype, flat[i:j], where=where, threads=1)
                self.release(name, 2 * i, 2 * j)
            return out
        if t.dtype != "BF16" and store == dtype:
            self._read(t.begin, flat)
            return out if where is None else check_finite(out, where)
        step = max(1, _CHUNK_BYTES // store.itemsize)
        buf = np.empty(min(step, flat.size), store)
        for i in range(0, flat.size, step):
            piece = buf[:min(step, flat.size - i)]
            self._read(t.begin + i * store.itemsize, piece)
            flat[i:i + piece.size] = bf16_to_f32(piece) if t.dtype == "BF16" else piece
        return out if where is None else check_finite(out, where)

    def _read(self, offset: int, into: np.ndarray) -> None:
        """Fill the contiguous array ``into`` with the file's bytes from ``offset``."""
        mv = memoryview(into).cast("B")
        done = 0
        while done < len(mv):
            if hasattr(os, "preadv"):
                n = os.preadv(self._f.fileno(), [mv[done:]], offset + done)
            else:  # no preadv (Windows): seek + readinto
                self._f.seek(offset + done)
                n = self._f.readinto(mv[done:])
            if not n:
                raise MinibloomError(f"{self.path}: file ended while reading (changed or truncated after opening?)")
            done += n

    def release(self, name: str, lo: int = 0, hi: int | None = None) -> None:
        """Drop the mapped pages of tensor ``name`` (its bytes ``lo:hi``) from this process's RSS once ``raw()``
        views of them are no longer needed; the page cache keeps them, so reading them again is cheap."""
        t = self.info(name)
        hi = t.nbytes if hi is None else hi
        if self._mm is None or not hasattr(self._mm, "madvise"):
            return
        page = mmap.PAGESIZE
        start = (t.begin + lo + page - 1) // page * page  # whole pages inside the range only
        stop = (t.begin + hi) // page * page
        if stop > start:
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, start, stop - start)
            except (OSError, ValueError):
                pass

    def advise(self, name: str, need: bool) -> None:
        """Tell the kernel whether tensor ``name``'s bytes will be read again soon (``need``: read them into the page
        cache in the background) or not (drop them from it; later reads come from disk). Best effort."""
        t = self.info(name)
        if t.nbytes and hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(self._f.fileno(), t.begin, t.nbytes,
                                 os.POSIX_FADV_WILLNEED if need else os.POSIX_FADV_DONTNEED)
            except OSError:
                pass

    def close(self) -> None:
        # views handed out by raw()/get() keep the mapping alive; closing is best effort
        try:
            if self._mm is not None:
                self._mm.close()
        except BufferError:
            pass
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_file(path: str | os.PathLike, entries, metadata: dict | None = None) -> None:
    """Stream a safetensors file: the header from the shapes alone, then each tensor's bytes in chunks.

    ``entries``: (name, shape, code, chunks) in file order, where ``code`` is the safetensors dtype ("F32", "F16",
    "BF16", ...) and ``chunks`` a callable returning an iterable of little-endian arrays (or bytes) that together hold
    the tensor's values in C order. Nothing bigger than one chunk is ever held, so checkpoints larger than RAM can be
    written. The file appears under ``path`` only once complete (written to ``path.part`` first).
    """
    entries = list(entries)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    pos = 0
    for name, shape, code, _ in entries:
        if code not in DTYPES:
            raise MinibloomError(f"{path}: unknown dtype code {code!r} for tensor {name!r}")
        n = int(np.prod(shape, dtype=np.int64)) * DTYPES[code].itemsize
        header[name] = {"dtype": code, "shape": [int(d) for d in shape], "data_offsets": [pos, pos + n]}
        pos += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    path = os.fspath(path)
    with open(path + ".part", "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for name, _, _, chunks in entries:
            start = f.tell()
            for c in chunks():
                f.write(c if isinstance(c, bytes) else np.ascontiguousarray(c).tobytes())
            want = header[name]["data_offsets"]
            if f.tell() - start != want[1] - want[0]:
                raise MinibloomError(f"{path}: tensor {name!r} got {f.tell() - start} bytes, expected "
                                     f"{want[1] - want[0]}")
    os.replace(path + ".part", path)


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict | None = None,
              bf16: tuple[str, ...] = ()) -> None:
    """Write a safetensors file of in-memory arrays (``write_file``). Names in ``bf16`` are stored as BF16."""
    codes = {v: k for k, v in DTYPES.items() if k not in ("BF16",)}

    def entry(name, arr):
        arr = np.ascontiguousarray(arr)
        if name in bf16:
            u16 = f32_to_bf16(arr)
            return name, arr.shape, "BF16", lambda: [u16]
        code = codes.get(arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype)
        if code is None:
            raise MinibloomError(f"{path}: cannot store tensor {name!r} of dtype {arr.dtype}")
        return name, arr.shape, code, lambda: [arr.astype(arr.dtype.newbyteorder("<"))]

    write_file(path, [entry(name, arr) for name, arr in tensors.items()], metadata)

"""TensorBoard event files without TensorBoard: scalars and PNG images, written as TFRecords.

An event file is a sequence of records ``len (u64 LE) · masked-crc32c(len) · data · masked-crc32c(data)``
whose data are ``Event`` protocol buffers (tensorflow/core/util/event.proto): the first carries
``file_version = "brain.Event:2"``, the others a ``Summary`` of ``Value``s (tag + simple_value, or tag +
``Image`` with an encoded PNG). Only those few fields are written, so the encoder is a handful of lines;
``read_events`` decodes them back (checking every CRC) for tests and tools.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import time
from pathlib import Path

_CRC_TABLE: list[int] = []


def _table() -> list[int]:
    if not _CRC_TABLE:
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # CRC-32C (Castagnoli), reflected
            _CRC_TABLE.append(c)
    return _CRC_TABLE


def crc32c(data: bytes) -> int:
    table, c = _table(), 0xFFFFFFFF
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# -- protocol-buffer encoding of the fields used ------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # int64: negatives as two's complement
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _bytes(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def _event(step: int, *, summary: bytes | None = None, file_version: str | None = None) -> bytes:
    out = _key(1, 1) + struct.pack("<d", time.time()) + _key(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _bytes(3, file_version.encode())
    if summary is not None:
        out += _bytes(5, summary)
    return out


def _scalar_value(tag: str, value: float) -> bytes:
    return _bytes(1, tag.encode()) + _key(2, 5) + struct.pack("<f", float(value))


def _image_value(tag: str, image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    img = (_key(1, 0) + _varint(image.height) + _key(2, 0) + _varint(image.width) + _key(3, 0) + _varint(3)
           + _bytes(4, buf.getvalue()))
    return _bytes(1, tag.encode()) + _bytes(4, img)


class EventWriter:
    """Appends scalars and images to a new ``events.out.tfevents.*`` file in ``folder`` (one file per
    writer, so a resumed run adds a file and leaves the earlier ones as they were)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        for n in range(10_000):  # a writer opened in the same second by the same process gets its own file
            self.path = self.folder / (f"{stem}.rflow" if n == 0 else f"{stem}.{n}.rflow")
            try:
                self._f = open(self.path, "xb")
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"no free event file name in {self.folder}")
        self._write(_event(0, file_version="brain.Event:2"))
        self.flush()

    def _write(self, data: bytes) -> None:
        head = struct.pack("<Q", len(data))
        self._f.write(head + struct.pack("<I", masked_crc(head)) + data + struct.pack("<I", masked_crc(data)))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One event holding every ``tag: value`` of ``values`` at ``step``."""
        self._write(_event(step, summary=b"".join(_bytes(1, _scalar_value(k, v)) for k, v in values.items())))

    def image(self, tag: str, image, step: int) -> None:
        """A PIL image, stored as PNG."""
        self._write(_event(step, summary=_bytes(1, _image_value(tag, image))))

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- reading back ---------------------------------------------------------------------------------
def _fields(data: bytes):
    """(field number, wire type, value) of a protocol-buffer message: ints for varints, bytes for
    length-delimited and fixed-width fields."""
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = data[i:i + n], i + n
        elif wire == 2:
            n, i = _read_varint(data, i)
            value, i = data[i:i + n], i + n
        else:
            raise ValueError(f"unsupported protocol-buffer wire type {wire}")
        yield field, wire, value


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = n = 0
    while True:
        b = data[i]
        n |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return n, i


def read_events(path: Path) -> list[dict]:
    """Every event of an event file as ``{"wall_time", "step", "file_version"?, "scalars": {tag: value},
    "images": {tag: png bytes}}``; a bad length or data CRC raises ``ValueError``."""
    raw, i, out = Path(path).read_bytes(), 0, []
    while i < len(raw):
        if i + 12 > len(raw):
            raise ValueError(f"{path}: truncated record header at byte {i}")
        head = raw[i:i + 8]
        (n,), (crc,) = struct.unpack("<Q", head), struct.unpack("<I", raw[i + 8:i + 12])
        if crc != masked_crc(head):
            raise ValueError(f"{path}: record length CRC mismatch at byte {i}")
        data = raw[i + 12:i + 12 + n]
        if len(data) != n or i + 16 + n > len(raw):
            raise ValueError(f"{path}: truncated record at byte {i}")
        if struct.unpack("<I", raw[i + 12 + n:i + 16 + n])[0] != masked_crc(data):
            raise ValueError(f"{path}: record data CRC mismatch at byte {i}")
        i += 16 + n
        ev: dict = {"scalars": {}, "images": {}}
        for field, _, value in _fields(data):
            if field == 1:
                ev["wall_time"] = struct.unpack("<d", value)[0]
            elif field == 2:
                ev["step"] = value - (1 << 64) if value >= 1 << 63 else value
            elif field == 3:
                ev["file_version"] = value.decode()
            elif field == 5:
                for f, _, v in _fields(value):
                    if f == 1:
                        _read_value(v, ev)
        out.append(ev)
    return out


def _read_value(data: bytes, ev: dict) -> None:
    tag, simple, image = None, None, None
    for field, _, value in _fields(data):
        if field == 1:
            tag = value.decode()
        elif field == 2:
            simple = struct.unpack("<f", value)[0]
        elif field == 4:
            image = next((v for f, _, v in _fields(value) if f == 4), b"")
    if simple is not None:
        ev["scalars"][tag] = simple
    if image is not None:
        ev["images"][tag] = image

"""TensorBoard event files: CRC-32C, the record framing and the Event/Summary fields round trip."""

import io
import struct

import pytest
from PIL import Image

from rflow.train.tensorboard import EventWriter, crc32c, masked_crc, read_events


def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)
    assert crc32c(b"") == 0


def test_round_trip(tmp_path):
    img = Image.new("RGB", (6, 4), (255, 0, 255))
    with EventWriter(tmp_path / "tb") as w:
        w.scalars(1, {"train/loss": 0.5, "train/lr": 1e-4})
        w.scalars(2, {"train/loss": -2.25})
        w.image("samples", img, 2)
    (path,) = (tmp_path / "tb").iterdir()
    assert path.name.startswith("events.out.tfevents.")
    ev = read_events(path)
    assert ev[0]["file_version"] == "brain.Event:2" and ev[0]["step"] == 0
    assert [e["step"] for e in ev[1:]] == [1, 2, 2]
    assert ev[1]["scalars"] == {"train/loss": 0.5, "train/lr": pytest.approx(1e-4)}
    assert ev[2]["scalars"] == {"train/loss": -2.25}
    back = Image.open(io.BytesIO(ev[3]["images"]["samples"]))
    assert back.size == (6, 4) and back.getpixel((0, 0)) == (255, 0, 255)
    assert all(abs(e["wall_time"] - ev[0]["wall_time"]) < 60 for e in ev)
    # the framing: length, masked CRC of the length, data, masked CRC of the data
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert struct.unpack("<I", raw[8:12])[0] == masked_crc(raw[:8])
    assert struct.unpack("<I", raw[12 + n:16 + n])[0] == masked_crc(raw[12:12 + n])


def test_corruption_detected(tmp_path):
    with EventWriter(tmp_path) as w:
        w.scalars(1, {"loss": 1.0})
    (path,) = tmp_path.iterdir()
    raw = bytearray(path.read_bytes())
    raw[-6] ^= 0xFF  # inside the last record's data
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="CRC"):
        read_events(path)
    path.write_bytes(bytes(raw[:-3]))
    with pytest.raises(ValueError, match="truncated"):
        read_events(path)


def test_writers_in_one_second_get_their_own_files(tmp_path, monkeypatch):
    import rflow.train.tensorboard as tb

    monkeypatch.setattr(tb.time, "time", lambda: 1_700_000_000.25)  # both writers open in the same second
    with EventWriter(tmp_path) as w:
        w.scalars(1, {"loss": 1.0})
    with EventWriter(tmp_path) as w:
        w.scalars(2, {"loss": 2.0})
    paths = sorted(tmp_path.iterdir())
    assert len(paths) == 2
    steps = sorted([e["step"] for e in read_events(p) if e["scalars"]] for p in paths)
    assert steps == [[1], [2]]

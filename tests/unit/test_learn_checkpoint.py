"""learn/checkpoint.py: round trip, refusal of truncated / corrupt files, atomic replacement."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from mlfabric.errors import MlfabricError  # noqa: E402
from mlfabric.learn import checkpoint  # noqa: E402
from mlfabric.learn.checkpoint import MAGIC, CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {
        "conv.weight": torch.randn(4, 1, 3, 3, generator=gen),
        "fc.bias": torch.randn(3, generator=gen).double(),
        "half": torch.randn(5, generator=gen).half(),
        "bf": torch.randn(2, 3, generator=gen).bfloat16(),
        "steps": torch.tensor(12345678901, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(7, dtype=torch.uint8),
        "empty": torch.zeros(0, 5),
        "strided": torch.arange(12, dtype=torch.int32).reshape(3, 4).t(),  # non-contiguous input
    }


def _save(path: Path) -> dict[str, torch.Tensor]:
    t = _tensors()
    save_checkpoint(path, t, {"round": 7, "model_id": "digits", "acc": [0.5, 0.9]})
    return t


def test_round_trip_keeps_names_dtypes_shapes_values_and_meta(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    src = _save(path)
    got, meta = load_checkpoint(path)
    assert meta == {"round": 7, "model_id": "digits", "acc": [0.5, 0.9]}
    assert list(got) == list(src)
    for name, t in src.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name
    assert got["strided"].is_contiguous()
    assert os.listdir(tmp_path) == ["model.ckpt"]  # no temp file left behind


def test_model_state_dict_round_trips(tmp_path: Path) -> None:
    from mlfabric.learn.digits import DigitsTask

    task = DigitsTask(device="cpu")
    model = task.build_model(5)
    save_checkpoint(tmp_path / "m.ckpt", model.state_dict(), {})
    tensors, _ = load_checkpoint(tmp_path / "m.ckpt")
    fresh = task.build_model(6)
    fresh.load_state_dict(tensors)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True))


@pytest.mark.parametrize("keep", [0, 5, 15, 16, 40, -1, -8])
def test_truncated_files_are_refused(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "m.ckpt"
    _save(path)
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[: len(data) + keep])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_trailing_bytes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.ckpt"
    _save(path)
    path.write_bytes(path.read_bytes() + b"\x00" * 8)
    with pytest.raises(CheckpointError, match="trailing"):
        load_checkpoint(path)


def _rewrite_header(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data, 8)
    header = json.loads(data[16 : 16 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(MAGIC + struct.pack("<Q", len(new)) + new + data[16 + n :])


def _first(h: dict) -> dict:
    return h["tensors"][0]


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: _first(h).update(dtype="object"),
        lambda h: _first(h).update(dtype="complex64"),
        lambda h: _first(h).update(shape=[4, 1, 3, 4]),
        lambda h: _first(h).update(shape=[-4, 1, 3, 3]),
        lambda h: _first(h).update(shape="36"),
        lambda h: _first(h).update(nbytes=10),
        lambda h: _first(h).update(offset=8),
        lambda h: _first(h).update(offset=-8),
        lambda h: _first(h).update(offset=1 << 40),
        lambda h: _first(h).update(name=""),
        lambda h: _first(h).update(extra=1),
        lambda h: _first(h).pop("nbytes"),
        lambda h: h["tensors"][1].update(name=_first(h)["name"]),
        lambda h: h.update(tensors={}),
        lambda h: h.update(meta=[]),
        lambda h: h.update(code="os.system"),
        lambda h: h["tensors"].reverse(),
        lambda h: h.pop("blake2b"),
        lambda h: h.update(blake2b=0),
        lambda h: h.update(blake2b="00" * 16),
    ],
)
def test_corrupt_headers_are_refused(tmp_path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "m.ckpt"
    _save(path)
    _rewrite_header(path, edit)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


@pytest.mark.parametrize("where", ["magic", "length", "json"])
def test_damaged_bytes_are_refused(tmp_path: Path, where: str) -> None:
    path = tmp_path / "m.ckpt"
    _save(path)
    data = bytearray(path.read_bytes())
    if where == "magic":
        data[0] ^= 0xFF
    elif where == "length":
        data[8:16] = struct.pack("<Q", 1 << 62)
    else:
        data[16] = ord("[")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


@pytest.mark.parametrize("at", [0, 1, 100, -1])
def test_flipped_data_bits_are_caught_by_the_checksum(tmp_path: Path, at: int) -> None:
    path = tmp_path / "m.ckpt"
    _save(path)
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack_from("<Q", data, 8)
    data[16 + n + at if at >= 0 else at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)


def test_bool_bytes_other_than_0_1_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, {"mask": torch.tensor([True, False])}, {})
    data = bytearray(path.read_bytes())
    data[-8] = 7  # the first (only) tensor sits at the start of the data, padded to 8
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="bool"):
        load_checkpoint(path)


def test_missing_file_and_error_hierarchy(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "nope.ckpt")
    assert isinstance(info.value, MlfabricError)


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    path = tmp_path / "m.ckpt"
    with pytest.raises(ValueError):
        save_checkpoint(path, {"x": torch.zeros(2, dtype=torch.complex64)}, {})
    with pytest.raises(ValueError):
        save_checkpoint(path, {"x": torch.zeros(2)}, {"nan": float("nan")})
    with pytest.raises(ValueError):
        save_checkpoint(path, {"x": torch.zeros(2)}, {"obj": object()})
    assert os.listdir(tmp_path) == []


def test_a_failed_write_leaves_the_old_checkpoint_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.ckpt"
    old = _save(path)
    before = path.read_bytes()

    def crash(fd: int) -> None:
        raise OSError(5, "simulated I/O error during fsync")

    monkeypatch.setattr(checkpoint.os, "fsync", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, {"other": torch.ones(1000)}, {"round": 8})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.ckpt"]  # the temp file was removed
    got, meta = load_checkpoint(path)
    assert meta["round"] == 7 and torch.equal(got["conv.weight"], old["conv.weight"])


def test_a_crash_before_rename_leaves_a_stray_temp_file_that_does_not_matter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process killed between write and rename: the temp file stays, the target is the old one."""
    path = tmp_path / "m.ckpt"
    _save(path)
    before = path.read_bytes()

    class Killed(BaseException):
        pass

    def killed(src: str, dst: str) -> None:
        raise Killed

    monkeypatch.setattr(checkpoint.os, "replace", killed)
    monkeypatch.setattr(checkpoint.os, "unlink", lambda p: None)  # the dying process cleans nothing
    with pytest.raises(Killed):
        save_checkpoint(path, {"other": torch.ones(10)}, {"round": 8})
    monkeypatch.undo()
    stray = [p for p in os.listdir(tmp_path) if p != "m.ckpt"]
    assert len(stray) == 1 and stray[0].startswith(".m.ckpt.")
    assert path.read_bytes() == before
    assert load_checkpoint(path)[1]["round"] == 7
    assert load_checkpoint(tmp_path / stray[0])[1]["round"] == 8  # the temp was complete, just not renamed


def test_overwrite_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.ckpt"
    _save(path)
    save_checkpoint(path, {"w": torch.full((3,), 2.0)}, {"round": 9})
    got, meta = load_checkpoint(path)
    assert meta == {"round": 9} and list(got) == ["w"] and torch.equal(got["w"], torch.full((3,), 2.0))

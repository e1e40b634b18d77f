"""Pure parts of runtime/jobs.py: job specs, contributor bitmaps, the coordinator record, tensor views."""

from __future__ import annotations

import struct

import pytest

from mlfabric.errors import ConfigError, RemoteProtocolError
from mlfabric.runtime.jobs import CoordinatorState, JobSpec, _bitmap, _unbitmap, job_key, submit_query_to_spec


def test_spec_from_query_validates_and_defaults() -> None:
    spec = submit_query_to_spec({"job_id": "run-1", "task": "digits", "rounds": "7", "lr": ""})
    assert spec.rounds == 7 and spec.lr is None and spec.parents == 2 and spec.nodes_per_round == 0
    for bad in ({"job_id": "../etc", "rounds": "3"}, {"job_id": "ok", "rounds": "0"},
                {"job_id": "ok", "parents": "9"}, {"job_id": "ok", "surprise": "1"}, {"rounds": "2"}):
        with pytest.raises(ConfigError) as err:
            submit_query_to_spec(bad)
        assert "invalid job" in str(err.value)


def test_job_key_is_stable() -> None:
    assert job_key("a") == job_key("a") != job_key("b")


@pytest.mark.parametrize("n", [1, 7, 8, 9, 100, 256])
def test_bitmap_round_trip(n: int) -> None:
    sets = [frozenset(), frozenset(range(n)), frozenset(range(0, n, 3)), frozenset({n - 1})]
    for s in sets:
        data = _bitmap(s, n)
        assert len(data) == (n + 7) // 8
        assert _unbitmap(data, n) == s


def test_bitmap_of_the_wrong_length_is_a_protocol_error() -> None:
    with pytest.raises(RemoteProtocolError):
        _unbitmap(b"\x00\x00", 8)


def test_coordinator_record_round_trip() -> None:
    st = CoordinatorState(spec=JobSpec(job_id="j", rounds=3), roster=[5, 9], members={5: "a:1", 9: "b:2"},
                          next_round=2, history=[{"round": 0}, {"round": 1}],
                          failures=[{"node": "09", "round": 1}], status="running", submitted_unix=1.5)
    back = CoordinatorState.from_json(st.to_json())
    assert back == st


def test_tensor_views_share_memory() -> None:
    torch = pytest.importorskip("torch")
    from mlfabric.learn.tensorio import blob_from_tensor, tensor_bytes, tensor_from_blob

    t = torch.arange(10, dtype=torch.float32)
    view = tensor_bytes(t)
    assert view.readonly and len(view) == 40
    t[0] = 42.0
    assert bytes(view[:4]) == struct.pack("<f", 42.0)
    blob = blob_from_tensor(t, b"meta")
    back = tensor_from_blob(blob)  # read-only source: copied into writable memory
    assert torch.equal(back, t) and blob.meta == b"meta"
    received = bytearray(bytes(view))
    from mlfabric.wire.blob import TensorBlob

    shared = tensor_from_blob(TensorBlob("float32", (10,), received))
    received[0:4] = struct.pack("<f", 7.0)
    assert shared[0].item() == 7.0, "a received buffer is used in place"

"""The daemon's job host without a network: job specs from the control API, the job key, the payload
blobs (runtime/payloads.py), the lazy strategy, and a whole job on a one-node ring driven by the real
NodeCore and NodeDriver (the host's event order, persistence and restore)."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from mlfabric.config import FailureConfig, JobsConfig, OverlayConfig
from mlfabric.core.aggregate import WithPayload
from mlfabric.core.jobs import JobSpec, job_key
from mlfabric.core.node import NodeCore
from mlfabric.core.ring import ring_id
from mlfabric.errors import ConfigError, RemoteProtocolError
from mlfabric.runtime.driver import NodeDriver
from mlfabric.runtime.jobs import JobHost, submit_query_to_spec
from mlfabric.runtime.payloads import LazyFedAvg, blob_of, item_of
from mlfabric.wire.codec import decode
from mlfabric.wire.messages import ALL_TRAIN, JobPartial, JobRound, Message, Peer

PROBE = "mlfabric.learn.probe:IndexTask"


def test_spec_from_query_validates_and_defaults() -> None:
    spec = submit_query_to_spec({"job_id": "run-1", "task": "digits", "rounds": "7", "lr": ""})
    assert (spec.rounds, spec.lr, spec.nodes_per_round, spec.seed) == (7, None, 0, 0)
    assert submit_query_to_spec({"job_id": "r"}).rounds is None  # the submitting node fills in the task's
    # the old per-shard knobs are gone: the payload is one flat tensor
    for bad in ({"job_id": "../etc", "rounds": "3"}, {"job_id": "ok", "rounds": "0"}, {"job_id": "ok", "parents": "2"},
                {"job_id": "ok", "shard_bytes": "4096"}, {"job_id": "ok", "replicas": "2"},
                {"job_id": "ok", "surprise": "1"}, {"rounds": "2"}, {"job_id": "ok", "nodes_per_round": "-1"}):
        with pytest.raises(ConfigError, match="invalid job"):
            submit_query_to_spec(bad)


def test_job_key_is_the_ring_id_of_the_job_name() -> None:
    assert job_key("a") == ring_id("job:a") == 0x8D5B7F5359F4EFEE
    assert job_key("digits-demo-1") == 0xCA82AEBB1C2DC80D


def test_garbage_and_the_lazy_strategy_never_import_torch() -> None:
    """In a fresh interpreter: building the daemon's strategy and refusing garbage blobs loads no torch."""
    script = """
import sys
from mlfabric.runtime.payloads import LazyFedAvg, item_of
from mlfabric.errors import RemoteProtocolError
from mlfabric.wire.blob import TensorBlob
from mlfabric.wire.codec import encode
from mlfabric.wire.messages import Ping, JobPartial
LazyFedAvg()
bad = [b"\\x93\\x01", encode(Ping(1)), encode(JobPartial("x", 0, 0, 1, (0, 5), 1, 1, 1))]
for meta in bad:
    try:
        item_of(TensorBlob("float32", (4,), bytes(16), meta), lambda job: False, lambda job: None)
    except RemoteProtocolError:
        pass
    else:
        raise SystemExit("garbage accepted")
print("torch" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_payload_blobs_round_trip_with_the_header_validated() -> None:
    torch = pytest.importorskip("torch")
    from mlfabric.learn.strategy import Partial

    part = JobPartial("j", 3, 1, 9, (0, 1 << 40), 2, 5)
    blob, tensor = blob_of(WithPayload(part, Partial(torch.arange(6, dtype=torch.float32), 17), 24))
    assert decode(blob.meta) == JobPartial("j", 3, 1, 9, (0, 1 << 40), 2, 5, weight=17)  # weight from the payload
    assert (blob.dtype, blob.shape) == ("float32", (6,)) and tensor.data_ptr() != 0
    received = TensorBlob_like(blob)
    item = item_of(received, lambda job: job == "j", lambda job: 6)
    assert item.msg == decode(blob.meta) and item.payload.weight == 17
    assert torch.equal(item.payload.weighted_sum, torch.arange(6, dtype=torch.float32))
    received.data[0:4] = bytes(4)  # the tensor is the received buffer itself (no copy)
    assert item.payload.weighted_sum[0].item() == 0.0

    notice = JobRound("j", JobSpec(job_id="j", rounds=2).model_dump_json(), 1, 0, Peer(1, "a:1"), 0, (), ALL_TRAIN,
                      0, 1, with_model=True)
    blob, _ = blob_of(WithPayload(notice, torch.ones(6), 24))
    item = item_of(TensorBlob_like(blob), lambda job: False, lambda job: None)  # a notice may start a job here
    assert item.msg == notice and torch.equal(item.payload, torch.ones(6))

    cases = [
        (blob, lambda job: 7, "a model of 6 values for job 'j', whose model has 7"),
        (blob_of(WithPayload(part, Partial(torch.ones(6), 1), 24))[0], lambda job: None, "does not take part"),
        (blob_of(WithPayload(JobRound(**{**_fields(notice), "with_model": False}), torch.ones(6), 24))[0],
         lambda job: None, "not a JobPartial or a JobRound with its model"),
    ]
    for bad, numel, match in cases:
        with pytest.raises(RemoteProtocolError, match=match):
            item_of(bad, lambda job: False, numel)
    zero = blob_of(WithPayload(part, Partial(torch.ones(6), 0), 24))[0]
    with pytest.raises(RemoteProtocolError, match="weight 0"):
        item_of(zero, lambda job: True, lambda job: None)


def TensorBlob_like(blob):  # noqa: N802 - reads like the constructor it stands for
    """The blob as the receiving bulk lane delivers it: the same header, the bytes in a fresh buffer."""
    from mlfabric.wire.blob import TensorBlob

    return TensorBlob(blob.dtype, blob.shape, memoryview(bytearray(bytes(blob.data))), blob.meta)


def _fields(msg: Message) -> dict:
    return {name: getattr(msg, name) for name, _ in msg.KINDS}


def test_lazy_strategy_is_fedavg() -> None:
    torch = pytest.importorskip("torch")
    from mlfabric.learn.strategy import Partial

    s = LazyFedAvg()
    a, b = Partial(torch.ones(3), 2), Partial(torch.full((3,), 4.0), 1)
    c = s.copy(a)
    assert s.merge(c, b) is c and c.weight == 3 and torch.equal(c.weighted_sum, torch.full((3,), 5.0))
    assert torch.equal(a.weighted_sum, torch.ones(3)) and a.weight == 2  # the copy was merged into, not a
    assert s.nbytes(a) == 12 and s.nbytes(torch.zeros(5)) == 20


class _Nowhere:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Message]] = []

    def send_nowait(self, address: str, msg: Message) -> None:
        self.sent.append((address, msg))


def _node(data_dir: Path) -> tuple[NodeCore, NodeDriver, JobHost]:
    me = Peer(ring_id("solo"), "127.0.0.1:1")
    core = NodeCore(me, OverlayConfig(), random.Random(1), FailureConfig(), jobs=JobsConfig(), strategy=LazyFedAvg(),
                    tasks=[PROBE])
    driver = NodeDriver(core, _Nowhere())
    assert core.jobs is not None

    async def no_bulk(address: str, name: str, blob: object, timeout: float) -> None:
        raise AssertionError(f"a one-node job sent a blob to {address}")

    host = JobHost(core.jobs, call=driver.call, deliver=driver.on_message, send_blob=no_bulk, data_dir=data_dir,
                   tasks=[PROBE])
    driver.bulk = host.send_payload
    driver.listeners.append(host.on_event)
    return core, driver, host


async def test_a_job_on_a_one_node_ring_runs_through_the_host_and_is_restored_from_disk(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from mlfabric.learn.checkpoint import load_checkpoint

    core, driver, host = _node(tmp_path)
    driver.start([])
    submitted = await host.submit(JobSpec(job_id="solo", task=PROBE))
    assert submitted["rounds"] == 3 and submitted["coordinator"]["id"] == core.me.id  # the task's default rounds
    async with asyncio.timeout(30):
        while (v := host.status("solo")["jobs"].get("solo")) is None or v["host"]["models_applied"] < 3:
            await asyncio.sleep(0.01)
    assert v["status"] == "done" and v["role"] == "coordinator"
    assert [(h["round"], h["updates"], h["members"]) for h in v["history"]] == [(0, 1, 1), (1, 1, 1), (2, 1, 1)]
    assert v["host"]["trainings"] == 3 and v["host"]["commits"] == 3 and v["host"]["models_applied"] == 3
    await host.close()
    driver.stop()
    record = json.loads((tmp_path / "jobs" / "solo" / "job.json").read_text())
    assert record["status"] == "done" and [h["round"] for h in record["history"]] == [0, 1, 2]
    tensors, meta = load_checkpoint(tmp_path / "jobs" / "solo" / "model.ckpt")
    assert meta == {"job": "solo", "version": 3, "rank": 0, "parts": 1}
    assert bool((tensors["value"] == 1.0).all())  # the only node's update: data part 0, + 1
    assert not any(isinstance(m, WithPayload) for _, m in driver._transport.sent)  # type: ignore[attr-defined]

    core2, driver2, host2 = _node(tmp_path)
    await host2.restore()
    v2 = host2.status()["jobs"]["solo"]
    assert (v2["status"], v2["model_version"], v2["rank"], v2["host"]["model_version"]) == ("done", 3, 0, 3)
    assert v2["history"] == record["history"]
    await host2.close()

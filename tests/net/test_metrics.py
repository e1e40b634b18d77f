"""The Prometheus /metrics endpoint of a real daemon: counters of the overlay, the failure detector,
the transport and the training jobs, in the text exposition format, equal to what /status says."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from mlfabric.core.jobs import JobSpec
from mlfabric.runtime.cluster import ring_report

pytestmark = pytest.mark.net

_SAMPLE = re.compile(r'^(mlfabric_[a-z_]+(?:\{le="(?:[0-9.e+-]+|\+Inf)"\})?) (-?[0-9.e+]+)$')


async def _get_text(address: str, path: str) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(1 << 20), 5)
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 5):
            raw += chunk
    finally:
        writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return head, body


def _samples(body: str) -> dict[str, float]:
    samples = {}
    for line in body.splitlines():
        if line.startswith("#"):
            assert line.startswith(("# HELP mlfabric_", "# TYPE mlfabric_")), line
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        samples[m.group(1)] = float(m.group(2))
    return samples


async def _metrics(daemon: Any) -> dict[str, float]:
    head, body = await _get_text(daemon.control_address, "/metrics")
    assert head.startswith("HTTP/1.1 200") and "text/plain; version=0.0.4" in head
    return _samples(body)


async def test_metrics_expose_overlay_failure_and_transport_counters(daemon_factory, wait_until) -> None:
    a = await daemon_factory()
    b = await daemon_factory(seeds=[a.address])
    await wait_until(lambda: ring_report([a.status(), b.status()])["converged"], timeout=10, what="2-node ring")
    await wait_until(lambda: b.status()["counters"]["probes_sent"] > 0, timeout=10, what="a keep-alive probe")
    samples = await _metrics(b)
    status = b.status()
    for name in ("probes_sent_total", "acks_received_total", "deaths_declared_total", "notices_sent_total",
                 "notices_received_total", "lookups_started_total", "transport_frames_in_total",
                 "transport_bytes_out_total", "incarnation", "open_connections", "uptime_seconds",
                 "known_peers", "lookup_seconds_count", "lookup_seconds_sum", 'lookup_seconds_bucket{le="+Inf"}',
                 "job_rounds_completed_total", "aggregation_seconds_total", "job_partials_sent_total",
                 "transport_bulk_bytes_in_total", "job_bad_blobs_total", "jobs"):
        assert f"mlfabric_{name}" in samples, name
    assert samples["mlfabric_probes_sent_total"] >= 1
    assert samples["mlfabric_transport_frames_in_total"] > 0
    assert samples["mlfabric_deaths_declared_total"] == 0
    # /status and /metrics read the same counters (probes keep going: those may have moved on by a few)
    for name in ("deaths_declared", "notices_sent", "lookups_started"):
        assert samples[f"mlfabric_{name}_total"] == status["counters"][name], name
    assert 0 <= status["counters"]["probes_sent"] - samples["mlfabric_probes_sent_total"] <= 2
    assert samples["mlfabric_incarnation"] == status["incarnation"]
    assert samples["mlfabric_jobs"] == 0 and samples["mlfabric_job_rounds_completed_total"] == 0


async def test_job_metrics_count_a_one_round_probe_job(daemon_factory, wait_until) -> None:
    """After a one-round probe job on two daemons: the coordinator completed exactly one round and
    received the other's partial on the bulk lane; the other sent it; both applied one model."""
    a = await daemon_factory()
    b = await daemon_factory(seeds=[a.address])
    await wait_until(lambda: ring_report([a.status(), b.status()])["converged"], timeout=10, what="2-node ring")
    assert a.jobs is not None
    submitted = await a.jobs.submit(JobSpec(job_id="m", task="mlfabric.learn.probe:IndexTask", rounds=1))
    coord, other = (a, b) if submitted["coordinator"]["id"] == a.node_id else (b, a)

    def done() -> bool:
        views = [d.jobs.status("m")["jobs"].get("m") for d in (a, b)]  # type: ignore[union-attr]
        return all(v is not None and v["status"] == "done" and v["host"]["models_applied"] == 1 for v in views)

    await wait_until(done, timeout=30, what="the job done at both nodes")
    mc, mo = await _metrics(coord), await _metrics(other)
    assert mc["mlfabric_job_rounds_completed_total"] == 1 and mo["mlfabric_job_rounds_completed_total"] == 0
    assert mc["mlfabric_job_rounds_trained_total"] == mo["mlfabric_job_rounds_trained_total"] == 1
    assert mo["mlfabric_job_partials_sent_total"] >= 1 and mo["mlfabric_job_blobs_sent_total"] >= 1
    assert mc["mlfabric_job_partials_received_total"] >= 1 and mc["mlfabric_job_blobs_received_total"] >= 1
    assert mc["mlfabric_transport_bulk_bytes_in_total"] >= 4096 * 4  # the probe's partial: 4096 float32
    assert mo["mlfabric_transport_bulk_bytes_in_total"] >= 4096 * 4  # the final model, down the tree
    assert mc["mlfabric_jobs"] == mo["mlfabric_jobs"] == 1
    for m, d in ((mc, coord), (mo, other)):
        counters = d.status()["jobs"]
        for name in ("rounds_completed", "partials_sent", "partials_received", "blobs_sent", "bad_blobs"):
            assert m[f"mlfabric_job_{name}_total"] == counters[name], name

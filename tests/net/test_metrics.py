"""The Prometheus /metrics endpoint of a real daemon: counters of the overlay, the failure detector
and the transport, in the text exposition format."""

from __future__ import annotations

import asyncio
import re

import pytest

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


async def test_metrics_expose_overlay_failure_and_transport_counters(daemon_factory, wait_until) -> None:
    a = await daemon_factory()
    b = await daemon_factory(seeds=[a.address])
    await wait_until(lambda: ring_report([a.status(), b.status()])["converged"], timeout=10, what="2-node ring")
    await wait_until(lambda: b.status()["counters"]["probes_sent"] > 0, timeout=10, what="a keep-alive probe")
    head, body = await _get_text(b.control_address, "/metrics")
    assert head.startswith("HTTP/1.1 200") and "text/plain; version=0.0.4" in head
    samples = {}
    for line in body.splitlines():
        if line.startswith("#"):
            assert line.startswith(("# HELP mlfabric_", "# TYPE mlfabric_")), line
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        samples[m.group(1)] = float(m.group(2))
    for name in ("probes_sent_total", "acks_received_total", "deaths_declared_total", "notices_sent_total",
                 "notices_received_total", "lookups_started_total", "transport_frames_in_total",
                 "transport_bytes_out_total", "incarnation", "open_connections", "uptime_seconds",
                 "known_peers", "lookup_seconds_count", "lookup_seconds_sum", 'lookup_seconds_bucket{le="+Inf"}',
                 "job_rounds_completed_total", "aggregation_seconds_total", "job_partials_sent_total",
                 "transport_bulk_bytes_in_total"):
        assert f"mlfabric_{name}" in samples, name
    assert samples["mlfabric_probes_sent_total"] >= 1
    assert samples["mlfabric_transport_frames_in_total"] > 0
    assert samples["mlfabric_deaths_declared_total"] == 0

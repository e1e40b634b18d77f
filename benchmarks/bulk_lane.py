"""Bulk-lane throughput between two processes over loopback TCP. Prints one JSON object.

    python benchmarks/bulk_lane.py --mb 256 --count 8

The receiver runs in a child process (``--serve``); it prints its address, then reports the blobs it
received. The sender times ``BulkLane.send`` (which returns after the receiver's ACK, i.e. once the
whole blob sits in the receiver's preallocated buffer). Both sides run on uvloop and authenticate
with a cluster key. Compare with DESIGN.md: raw TCP loopback ~5.5 GB/s, uvloop BufferedProtocol ~4 GB/s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from mlfabric.config import TransportConfig
from mlfabric.runtime.bulk import allocate_payload
from mlfabric.runtime.driver import run
from mlfabric.runtime.transport import Transport
from mlfabric.wire.blob import TensorBlob
from mlfabric.wire.messages import Peer

KEY = b"bench-key"


async def serve(count: int, reuse: bool) -> None:
    t = Transport(TransportConfig(max_bulk_bytes=1 << 32), KEY)
    if reuse:  # receive every blob into one buffer that stays mapped (a preallocated tensor, say)
        buffers: dict[int, object] = {}

        def allocate(src: Peer, name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> object:
            if nbytes not in buffers:
                buffers[nbytes] = allocate_payload(nbytes)
            return buffers[nbytes]

        t.bulk.allocate = allocate  # type: ignore[assignment]
    port = await t.bind("127.0.0.1", 0)
    await t.start(Peer(2, f"127.0.0.1:{port}"), lambda src, msg: None, lambda address: None)
    print(t.me.address, flush=True)
    total = 0
    for _ in range(count):
        _, _, blob = await t.bulk.received.get()
        total += blob.nbytes
    await t.close()
    print(json.dumps({"received_bytes": total}), flush=True)


async def send(address: str, mb: int, count: int) -> dict[str, object]:
    t = Transport(TransportConfig(), KEY)
    port = await t.bind("127.0.0.1", 0)
    await t.start(Peer(1, f"127.0.0.1:{port}"), lambda src, msg: None, lambda address: None)
    blob = TensorBlob("float32", (mb * (1 << 20) // 4,), bytes(mb << 20))
    times = []
    for i in range(count):
        t0 = time.perf_counter()
        await t.bulk.send(address, f"blob{i}", blob)
        times.append(time.perf_counter() - t0)
    await t.close()
    best = min(times)
    total = sum(times)
    return {"blob_mb": mb, "count": count, "best_gbps": round((mb << 20) / best / 1e9, 2),
            "mean_gbps": round(count * (mb << 20) / total / 1e9, 2), "first_s": round(times[0], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--reuse", action="store_true", help="receiver reuses one buffer (no fresh pages per blob)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        run(serve(args.count, args.reuse))
        return 0
    child = subprocess.Popen([sys.executable, __file__, "--serve", "--count", str(args.count),
                              *(["--reuse"] if args.reuse else [])],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        address = child.stdout.readline().strip()
        result = run(send(address, args.mb, args.count))
        result["receiver"] = json.loads(child.stdout.readline())
    finally:
        child.wait(timeout=30)
    print(json.dumps({"benchmark": "bulk_lane", "reuse": args.reuse, **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

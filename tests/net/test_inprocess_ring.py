"""In-process daemons over real TCP: join, convergence to the ideal ring, restart identity, graceful leave."""

from __future__ import annotations

import asyncio
import os
import stat
import sys

import pytest

from mlfabric.core.events import Joined, PeerUnresponsive, PredecessorChanged
from mlfabric.core.ring import successor_of
from mlfabric.errors import ConfigError
from mlfabric.runtime.cluster import ring_report
from mlfabric.runtime.control import get_json
from mlfabric.runtime.daemon import Daemon

pytestmark = pytest.mark.net


def converged(daemons: list[Daemon]) -> bool:
    return ring_report([d.status() for d in daemons])["converged"]


async def test_two_daemons_join_over_tcp(daemon_factory, wait_until) -> None:
    a = await daemon_factory()
    b = await daemon_factory(seeds=[a.address])
    joined = await b.driver.wait_for(lambda ev: isinstance(ev, Joined), timeout=5, include_past=True)
    assert joined.successor.id == a.node_id
    await a.driver.wait_for(
        lambda ev: isinstance(ev, PredecessorChanged) and ev.predecessor is not None
        and ev.predecessor.id == b.node_id, timeout=5, include_past=True)
    await wait_until(lambda: converged([a, b]), timeout=5, what="two-node ring")
    assert a.core.chord.successor.id == b.node_id and b.core.chord.successor.id == a.node_id
    # the control endpoint answers over HTTP
    code, body = await get_json(b.control_address, "/status")
    assert code == 200 and body["id"] == b.node_id and body["predecessor"]["id"] == a.node_id
    # torch_loaded reports this process; other tests in it may have imported torch already (a
    # separate daemon process that never trains is checked in test_cli_node.py).
    assert body["transport"]["frames_in"] > 0 and body["torch_loaded"] is ("torch" in sys.modules)


async def test_eight_daemons_converge_to_the_ideal_ring(daemon_factory, wait_until) -> None:
    first = await daemon_factory()
    daemons = [first] + [await daemon_factory(seeds=[first.address]) for _ in range(7)]
    await wait_until(lambda: converged(daemons), timeout=15, what="ideal 8-node ring")
    ring = sorted(d.node_id for d in daemons)
    for d in daemons:  # every node's lookups return the true successor
        for key in (0, d.node_id, (d.node_id + 1) % 2**64, 2**63, 2**64 - 1):
            done = await d.driver.lookup(key, timeout=5)
            assert done.node is not None and done.node.id == successor_of(key, ring)


async def test_restart_with_the_same_data_dir_keeps_the_id(daemon_factory, tmp_path) -> None:
    a = await daemon_factory(name="keep")
    node_id = a.node_id
    key_file = tmp_path / "keep" / "node.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600 and len(key_file.read_bytes()) == 32
    await a.stop()
    b = await daemon_factory(name="keep")
    assert b.node_id == node_id and b.address != ""  # the port may differ (port 0), the id may not


async def test_two_daemons_cannot_share_a_data_dir(daemon_factory) -> None:
    await daemon_factory(name="shared")
    with pytest.raises(ConfigError, match="in use by another node"):
        await daemon_factory(name="shared")


async def test_graceful_leave_repairs_neighbours_at_once(daemon_factory, wait_until) -> None:
    first = await daemon_factory()
    daemons = [first] + [await daemon_factory(seeds=[first.address]) for _ in range(4)]
    await wait_until(lambda: converged(daemons), timeout=15, what="ideal 5-node ring")
    leaver = sorted(daemons[1:], key=lambda d: d.node_id)[1]
    rest = [d for d in daemons if d is not leaver]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await leaver.stop()  # Leaving goes to predecessor and successor before the sockets close
    ring = sorted(d.node_id for d in rest)
    by_id = {d.node_id: d for d in rest}
    succ = by_id[successor_of(leaver.node_id, ring)]
    pred = by_id[ring[ring.index(succ.node_id) - 1]]

    def neighbours_repaired() -> bool:
        p = succ.core.chord.predecessor
        return pred.core.chord.successor.id == succ.node_id and p is not None and p.id == pred.node_id

    # well under one rpc_timeout (0.5 s in the local preset): no failure detection was needed
    await wait_until(neighbours_repaired, timeout=0.4, interval=0.005, what="neighbours repaired after leave")
    assert loop.time() - t0 < 0.5
    for d in (pred, succ):  # repaired by the Leaving hand-over, not by failure detection
        assert not [ev for ev in d.driver.history if isinstance(ev, PeerUnresponsive)]
    await wait_until(lambda: converged(rest), timeout=10, what="ideal 4-node ring")

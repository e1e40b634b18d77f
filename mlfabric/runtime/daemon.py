"""Daemon lifecycle: identity on disk, transport + driver + control endpoint, graceful SIGTERM.

``data_dir`` holds ``node.key`` (32 random bytes, 0600, written atomically: the node id is
``ring_id(key)``, so a restart with the same data dir keeps its id), ``control`` (the control
endpoint's bound address, for ``mlfabric status --data-dir``) and ``lock`` (one daemon per data dir).
On SIGINT/SIGTERM the node leaves gracefully (Chord §4.4: Leaving to predecessor and successor),
waits a bounded time for those frames to go out, and stops. Every task is owned by the component
that created it and is cancelled on stop. A node that does not train never imports torch
(``/status`` reports ``torch_loaded``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import random
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from mlfabric import __version__
from mlfabric.config import Settings, parse_address
from mlfabric.core.events import (
    Event,
    Joined,
    Left,
    PeerDied,
    PeerPurged,
    PeerUnresponsive,
    PredecessorChanged,
    Refuted,
    SuccessorChanged,
)
from mlfabric.core.node import NodeCore
from mlfabric.core.ring import BITS, ring_id
from mlfabric.errors import ConfigError
from mlfabric.runtime.bulk import BlobHandler
from mlfabric.runtime.control import ControlServer, Response
from mlfabric.runtime.driver import NodeDriver
from mlfabric.runtime.files import write_atomic
from mlfabric.runtime.jobs import JobHost, submit_query_to_spec
from mlfabric.runtime.payloads import LazyFedAvg
from mlfabric.runtime.systemd import SystemdNotifier, first_join_bound, notify_lifecycle
from mlfabric.runtime.transport import Transport
from mlfabric.wire.blob import TensorBlob
from mlfabric.wire.messages import Message, Peer

logger = logging.getLogger(__name__)

KEY_FILE = "node.key"
INCARNATION_FILE = "incarnation"
CONTROL_FILE = "control"
LOCK_FILE = "lock"
KEY_LEN = 32


# -------------------------------------------------------------------- identity and files


def load_identity(data_dir: Path) -> bytes:
    """The node key in ``data_dir`` (created on first start). Raises ConfigError if it is unusable."""
    path = data_dir / KEY_FILE
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = secrets.token_bytes(KEY_LEN)
        write_atomic(path, key, 0o600)
        logger.info("created node key %s", path)
        return key
    except OSError as exc:
        raise ConfigError(f"cannot read node key {path}: {exc.strerror}") from None
    if len(key) != KEY_LEN:
        raise ConfigError(f"{path} is not a node key (expected {KEY_LEN} bytes, found {len(key)})")
    return key


def next_incarnation(data_dir: Path) -> int:
    """Bump and persist the incarnation in ``data_dir``: a restarted node outranks every death that
    was declared for its previous run (failure notices carry the incarnation they refer to)."""
    path = data_dir / INCARNATION_FILE
    try:
        previous = int(path.read_text().strip() or "0")
    except FileNotFoundError:
        previous = -1
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read incarnation file {path}: {exc}") from None
    current = max(previous + 1, 0)
    write_atomic(path, f"{current}\n".encode(), 0o644)
    return current


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# -------------------------------------------------------------------- logging


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (unix seconds), level, logger, msg, and exc when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


# -------------------------------------------------------------------- the daemon


LOOKUP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Daemon:
    """One mlfabric node. ``await start()``, then ``await stop()``; or ``await run()`` for the CLI."""

    def __init__(self, settings: Settings, *, rng_seed: int | None = None, on_blob: BlobHandler | None = None) -> None:
        self.settings = settings
        self.rng_seed = secrets.randbits(64) if rng_seed is None else rng_seed
        self._on_blob = on_blob
        self.data_dir = Path(settings.data_dir)
        self.peer: Peer | None = None
        self.core: NodeCore | None = None
        self.driver: NodeDriver | None = None
        self.transport: Transport | None = None
        self.control: ControlServer | None = None
        self.control_address: str | None = None
        self.jobs: JobHost | None = None
        self._lookup_hist = [0] * len(LOOKUP_BUCKETS)
        self._lookup_over = 0
        self._lookup_sum = 0.0
        self._lock_fd: int | None = None
        self._started_at = 0.0
        self._stop_requested: asyncio.Event | None = None
        self._stopped = False

    # ---------------------------------------------------------------- properties

    @property
    def address(self) -> str:
        assert self.peer is not None, "daemon not started"
        return self.peer.address

    @property
    def node_id(self) -> int:
        assert self.peer is not None, "daemon not started"
        return self.peer.id

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"cannot create data_dir {self.data_dir}: {exc.strerror}") from None
        self._lock_data_dir()
        try:
            await self._start_components(settings)
        except BaseException:
            await self._teardown()
            raise
        self._started_at = loop.time()
        logger.info("node %016x listening on %s, control %s (data_dir %s, rng seed %d)",
                    self.node_id, self.address, self.control_address, self.data_dir, self.rng_seed)

    async def _start_components(self, settings: Settings) -> None:
        cluster_key = settings.key_bytes()  # configuration errors first, before anything is written
        if settings.preload_torch:
            t0 = time.perf_counter()
            import torch  # noqa: F401 - before the ring knows us: the import's CPU burst stalls no probe

            logger.info("torch imported in %.2f s (preload_torch)", time.perf_counter() - t0)
        host, port = parse_address(settings.listen, allow_zero=True)
        self.transport = Transport(settings.transport, cluster_key, on_blob=self._dispatch_blob)
        try:
            real_port = await self.transport.bind(host, port)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {settings.listen}: {exc.strerror or exc}") from None
        node_key = load_identity(self.data_dir)
        advertise = settings.advertise or format_address(host, real_port)
        if settings.advertise is None and host in ("0.0.0.0", "::", ""):
            logger.warning("listening on a wildcard address without --advertise: peers are told %s", advertise)
        self.peer = Peer(ring_id(node_key), advertise)
        incarnation = next_incarnation(self.data_dir)
        self.core = NodeCore(self.peer, settings.overlay, random.Random(self.rng_seed), failure=settings.failure,
                             incarnation=incarnation, jobs=settings.jobs, strategy=LazyFedAvg(), tasks=settings.tasks)
        self.driver = driver = NodeDriver(self.core, self.transport)
        driver.listeners.append(self._log_event)
        transport = self.transport
        assert self.core.jobs is not None
        self.jobs = JobHost(
            self.core.jobs, call=driver.call, deliver=driver.on_message,
            send_blob=lambda address, name, blob, timeout: transport.bulk.send(address, name, blob, timeout=timeout),
            data_dir=self.data_dir, tasks=settings.tasks, torch_threads=settings.torch_threads,
            send_timeout=settings.jobs.result_timeout)
        driver.bulk = self.jobs.send_payload
        driver.listeners.append(self.jobs.on_event)
        await self.jobs.restore()  # stored jobs go back to the core before the node joins
        await self.transport.start(self.peer, self._dispatch_message, self._dispatch_unreachable)
        self.control = ControlServer({"/status": self._status_route, "/lookup": self._lookup_route,
                                      "/metrics": self._metrics_route, "/jobs": self._jobs_route,
                                      "/job/submit": self._submit_route})
        chost, cport = parse_address(settings.control, allow_zero=True)
        try:
            self.control_address = await self.control.start(chost, cport)
        except OSError as exc:
            raise ConfigError(f"cannot listen on control {settings.control}: {exc.strerror or exc}") from None
        write_atomic(self.data_dir / CONTROL_FILE, self.control_address.encode() + b"\n", 0o644)
        self.driver.start(list(settings.seeds))

    async def stop(self, *, leave: bool = True, timeout: float | None = None) -> None:
        """Leave the ring (bounded wait for the Leaving frames), then close everything. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if leave and self.driver is not None and self.transport is not None and self.core is not None:
            if self.core.chord.joined:
                self.driver.leave()  # the core hands the jobs it coordinates to its successor, then leaves
                wait = self.settings.transport.connect_timeout if timeout is None else timeout
                await self.transport.drain(wait)
        if self.jobs is not None:
            await self.jobs.close()
        await self._teardown()
        logger.info("node stopped")

    async def _teardown(self) -> None:
        if self.driver is not None:
            self.driver.stop()
        if self.control is not None:
            await self.control.close()
        if self.transport is not None:
            await self.transport.close()
        with contextlib.suppress(OSError):
            (self.data_dir / CONTROL_FILE).unlink()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def wait_joined(self, timeout: float | None) -> None:
        """Return once this node has joined the ring (at once if it has); TimeoutError after ``timeout`` s."""
        assert self.core is not None and self.driver is not None, "daemon not started"
        if not self.core.chord.joined:
            await self.driver.wait_for(lambda event: isinstance(event, Joined), timeout, include_past=True)

    def request_stop(self) -> None:
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def run(self, *, announce: TextIO | None = None) -> None:
        """Start, print the ready line, serve until SIGINT/SIGTERM (or request_stop), then stop."""
        loop = asyncio.get_running_loop()
        await self.start()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
        notifier = SystemdNotifier.from_environ()  # no-op without NOTIFY_SOCKET; see runtime/systemd.py
        notify_task: asyncio.Task[None] | None = None
        try:
            out = announce or sys.stdout
            print(f"mlfabric node {self.node_id:016x} listening on {self.address} control {self.control_address}",
                  file=out, flush=True)
            if notifier.enabled:
                notify_task = loop.create_task(notify_lifecycle(
                    notifier, self.wait_joined, node_id=self.node_id, address=self.address,
                    control=self.control_address, seeds=self.settings.seeds, bound=first_join_bound(self.settings),
                ), name="systemd-notify")
            assert self._stop_requested is not None
            await self._stop_requested.wait()
        finally:
            if notify_task is not None:
                notify_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await notify_task
            notifier.stopping()
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.stop()
            notifier.close()

    def _on_signal(self, sig: signal.Signals) -> None:
        logger.info("received %s: leaving the ring", sig.name)
        self.request_stop()

    def _lock_data_dir(self) -> None:
        path = self.data_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(f"data_dir {self.data_dir} is in use by another node") from None
        self._lock_fd = fd

    # ---------------------------------------------------------------- status and control routes

    def status(self) -> dict[str, Any]:
        assert self.core is not None and self.transport is not None
        out = self.core.status()
        out["uptime_s"] = round(asyncio.get_running_loop().time() - self._started_at, 3)
        out["pid"] = os.getpid()
        out["version"] = __version__
        out["control"] = self.control_address
        out["torch_loaded"] = "torch" in sys.modules
        out["rss_bytes"] = _rss_bytes()
        out["time_unix"] = time.time()
        out["transport"] = dict(self.transport.counters)
        out["open_connections"] = self.transport.open_connections
        out["peers"] = self.transport.peers()
        out["jobs"] = self._job_counters()
        return out

    def _job_counters(self) -> dict[str, float]:
        """The job machine's, its aggregator's and the host's public counters, one flat dict."""
        if self.core is None or self.core.jobs is None or self.jobs is None:
            return {}
        out: dict[str, float] = {}
        for source in (self.core.jobs.counters, self.core.jobs.agg.counters, self.jobs.counters):
            for k, v in source.items():
                assert k not in out, f"job counter {k} twice"
                out[k] = round(v, 6) if isinstance(v, float) else v
        return out

    def _dispatch_message(self, src: Peer, msg: Message) -> None:
        if self.driver is not None:
            self.driver.on_message(src, msg)

    def _dispatch_unreachable(self, address: str) -> None:
        if self.driver is not None:
            self.driver.on_unreachable(address)

    def _dispatch_blob(self, src: Peer, name: str, blob: TensorBlob) -> None:
        if self.jobs is not None and self.jobs.on_blob(src, name, blob):
            return
        if self._on_blob is not None:
            self._on_blob(src, name, blob)
        elif self.transport is not None:
            self.transport.bulk.received.put_nowait((src, name, blob))  # the lane's default: its queue

    async def _jobs_route(self, query: dict[str, str]) -> Response:
        assert self.jobs is not None
        return Response.json(self.jobs.status(query.get("job")))

    async def _submit_route(self, query: dict[str, str]) -> Response:
        assert self.jobs is not None
        try:
            spec = submit_query_to_spec(query)
            return Response.json(await self.jobs.submit(spec))
        except ConfigError as exc:
            return Response.error(400, str(exc))

    async def _status_route(self, query: dict[str, str]) -> Response:
        return Response.json(self.status())

    async def _metrics_route(self, query: dict[str, str]) -> Response:
        """Prometheus text exposition (format 0.0.4) of the node's counters and gauges."""
        assert self.core is not None and self.transport is not None
        st = self.core.status()
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, value: float, labels: str = "") -> None:
            lines.append(f"# HELP mlfabric_{name} {help_text}")
            lines.append(f"# TYPE mlfabric_{name} {kind}")
            lines.append(f"mlfabric_{name}{labels} {value}")

        for name, value in sorted(st["counters"].items()):
            metric(f"{name}_total", "counter", f"{name.replace('_', ' ')} since start", value)
        for name, value in sorted(self.transport.counters.items()):
            metric(f"transport_{name}_total", "counter", f"transport {name.replace('_', ' ')} since start", value)
        metric("incarnation", "gauge", "incarnation of this node (bumped on every restart and refutation)",
               st["incarnation"])
        metric("successors", "gauge", "entries in the successor list", len(self.core.chord.successors))
        metric("distinct_fingers", "gauge", "distinct nodes in the finger table",
               len(self.core.chord.distinct_fingers()))
        metric("open_connections", "gauge", "open TCP connections", self.transport.open_connections)
        metric("uptime_seconds", "gauge", "seconds since the node started",
               round(asyncio.get_running_loop().time() - self._started_at, 3))
        metric("known_peers", "gauge", "distinct peers this node holds a connection or routing entry for",
               len(self.transport.peers()))
        lines.append("# HELP mlfabric_lookup_seconds latency of lookups served by the control endpoint")
        lines.append("# TYPE mlfabric_lookup_seconds histogram")
        cumulative = 0
        for bound, count in zip(LOOKUP_BUCKETS, self._lookup_hist, strict=False):
            cumulative += count
            lines.append(f'mlfabric_lookup_seconds_bucket{{le="{bound:g}"}} {cumulative}')
        total = sum(self._lookup_hist) + self._lookup_over
        lines.append(f'mlfabric_lookup_seconds_bucket{{le="+Inf"}} {total}')
        lines.append(f"mlfabric_lookup_seconds_sum {self._lookup_sum:.6f}")
        lines.append(f"mlfabric_lookup_seconds_count {total}")
        for name, value in sorted(self._job_counters().items()):
            if name == "aggregation_seconds_total":
                metric(name, "counter", "seconds between successive models applied here, summed", value)
            else:
                name = name.removeprefix("job_")
                metric(f"job_{name}_total", "counter", f"training jobs: {name.replace('_', ' ')}", value)
        if self.core.jobs is not None:
            metric("jobs", "gauge", "training jobs this node knows", len(self.core.jobs.jobs))
        return Response(200, ("\n".join(lines) + "\n").encode(), "text/plain; version=0.0.4")

    async def _lookup_route(self, query: dict[str, str]) -> Response:
        assert self.driver is not None
        raw = query.get("key")
        if raw is None:
            return Response.error(400, "missing key parameter")
        try:
            key = int(raw, 0)
        except ValueError:
            return Response.error(400, f"key {raw!r} is not an integer")
        if not 0 <= key < 1 << BITS:
            return Response.error(400, f"key must be in 0..2^{BITS}-1")
        overlay = self.settings.overlay
        limit = overlay.rpc_timeout * 8 + 2.0
        try:
            done = await self.driver.lookup(key, timeout=limit)
        except TimeoutError:
            return Response.error(504, f"lookup did not finish within {limit:g}s")
        i = next((i for i, b in enumerate(LOOKUP_BUCKETS) if done.elapsed <= b), len(LOOKUP_BUCKETS))
        if i < len(LOOKUP_BUCKETS):
            self._lookup_hist[i] += 1
        else:
            self._lookup_over += 1
        self._lookup_sum += done.elapsed
        body: dict[str, Any] = {"key": key, "node": done.node.to_json() if done.node else None,
                                "hops": done.hops, "elapsed_s": round(done.elapsed, 6)}
        if done.node is None:
            body["error"] = "lookup failed"
            return Response.json(body, 503)
        return Response.json(body)

    def _log_event(self, event: Event) -> None:
        match event:
            case Joined(successor=succ):
                logger.info("joined the ring: successor %016x at %s", succ.id, succ.address)
            case Left():
                logger.info("left the ring")
            case PeerUnresponsive(peer=peer):
                logger.info("peer %016x at %s unresponsive: removed from routing state", peer.id, peer.address)
            case PeerDied(peer=peer, incarnation=inc, exact=exact):
                logger.warning("declared peer %016x at %s dead (incarnation %d; holder estimate %s)",
                               peer.id, peer.address, inc, "exact" if exact else "inexact, not propagated")
            case PeerPurged(peer=peer):
                logger.info("failure notice: peer %016x at %s purged from routing state", peer.id, peer.address)
            case Refuted(incarnation=inc):
                logger.warning("this node was declared dead by a peer; refuted with incarnation %d", inc)
            case SuccessorChanged(successor=succ):
                logger.debug("successor now %016x at %s", succ.id, succ.address)
            case PredecessorChanged(predecessor=pred):
                logger.debug("predecessor now %s", f"{pred.id:016x} at {pred.address}" if pred else "none")
            case _:
                pass

#!/usr/bin/env python3
"""A multi-host mlfabric testbed on one machine, in Linux network namespaces (needs root).

Layout (everything lives in namespaces named ``<prefix>-…``; the root namespace keeps nothing)::

    <prefix>-br   one bridge, br0, no address (a plain switch)
    <prefix>-n<i> host i: eth0 (a veth into the bridge) with 10.77.<1 + i // 250>.<1 + i % 250>/16, lo
    <prefix>-c    the client host: eth0 with 10.77.0.2/16; tests and status queries run here, because a
                  namespace's 10.x address must never be dialled from the root namespace (it routes out)

Each host gets the daemon (``mlfabric node --listen <addr>:7700 --control <addr>:7701``; node 0 is
every other node's seed) or any command (:meth:`Testbed.spawn`), and the network can be broken:

* :meth:`down` / :meth:`up`: the host's link goes down (cut off) / comes back;
* :meth:`partition`: groups of hosts that cannot reach each other (iptables DROP in each host, INPUT
  and OUTPUT, of every address outside its group: a silent partition, as a failed switch makes);
  :meth:`heal` removes it;
* :meth:`loss`: drop a random fraction p of the host's incoming packets (``iptables -m statistic
  --mode random``; this machine has no netem);
* :meth:`rate`: limit the host's outgoing bandwidth (``tc qdisc … tbf``).

Everything is undone by :meth:`close` (also on exit, SIGINT and SIGTERM when the CLI runs it): the
processes in the namespaces are killed, the namespaces deleted (their veths, addresses, iptables
rules and qdiscs go with them). ``testbed.py cleanup --prefix P`` removes leftovers of a run that
was killed with SIGKILL. Each run has its own random prefix (``mf`` + 5 hex digits), so runs never
collide.

Python API (what the tests use)::

    with Testbed(12, preset="local").start() as tb:
        tb.partition([range(6), range(6, 12)])
        statuses = tb.statuses()          # GET /status of every node, from the client namespace
        tb.heal()

CLI::

    testbed.py up --nodes 8 [--preset local]   # then type: status | partition 0,1,2/3,4,5 | heal |
                                               # down 3 | up 3 | loss 2 0.1 | rate 2 10mbit | quit
    testbed.py cleanup [--prefix mf]           # remove leftovers (all runs: the default prefix mf)
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

READY_RE = re.compile(rb"^mlfabric node ([0-9a-f]{16}) listening on (\S+) control (\S+)$", re.M)
PORT, CONTROL_PORT = 7700, 7701
CLIENT_ADDRESS = "10.77.0.2"
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,7}$")
_LIVE: set[Testbed] = set()  # for the atexit / signal cleanup


class TestbedError(RuntimeError):
    """The testbed could not be built or driven."""


def host_address(index: int) -> str:
    """10.77.1.1, 10.77.1.2, … 10.77.1.250, 10.77.2.1, …: never .0 or .255, never the client's."""
    block, last = divmod(index, 250)
    if block > 250:
        raise TestbedError("at most 62,750 hosts")
    return f"10.77.{1 + block}.{1 + last}"


def unavailable() -> str | None:
    """Why this machine cannot run the testbed (None when it can)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables", "iptables-restore", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    probe = f"mfprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    try:
        ok = subprocess.run(["ip", "netns", "exec", probe, "iptables", "-S"], capture_output=True, text=True)
        if ok.returncode != 0:
            return f"iptables in a namespace failed: {ok.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(argv: Sequence[str], *, ns: str | None = None, check: bool = True, stdin: str | None = None) -> str:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    res = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise TestbedError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def _mlfabric_argv() -> list[str]:
    """The daemon command: the ``mlfabric`` script beside this Python (the venv), else ``python -m``."""
    script = Path(sys.executable).with_name("mlfabric")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mlfabric"]


@dataclass(slots=True)
class Host:
    index: int
    ns: str
    address: str
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    id: int | None = None
    control: str | None = None

    @property
    def listen(self) -> str:
        return f"{self.address}:{PORT}"

    @property
    def log(self) -> Path:
        return self.workdir / "log"


@dataclass(eq=False)
class Testbed:
    """N hosts on one bridge; see the module docstring."""

    n: int
    preset: str = "local"
    prefix: str = field(default_factory=lambda: "mf" + secrets.token_hex(3)[:5])
    workdir: Path | None = None
    daemons: bool = True
    env: dict[str, str] = field(default_factory=dict)
    node_args: list[str] = field(default_factory=list)
    tcp_retries2: int | None = None
    ready_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not PREFIX_RE.match(self.prefix):
            raise TestbedError(f"prefix {self.prefix!r}: 2-8 lowercase letters and digits, a letter first")
        if self.n < 1:
            raise TestbedError("a testbed needs at least one host")
        self._own_workdir = self.workdir is None
        self.workdir = Path(self.workdir or tempfile.mkdtemp(prefix=f"mlfabric-{self.prefix}-"))
        self.hosts = [Host(i, f"{self.prefix}-n{i}", host_address(i), self.workdir / f"node{i}") for i in range(self.n)]
        self.bridge_ns = f"{self.prefix}-br"
        self.client_ns = f"{self.prefix}-c"
        self._namespaces: list[str] = []
        self._extra: list[subprocess.Popen[bytes]] = []
        self._agent: subprocess.Popen[str] | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Testbed:
        """Build the network and (unless ``daemons=False``) start a daemon on every host; return once
        every daemon listens. Cleans up and raises on failure."""
        _LIVE.add(self)
        try:
            self._build()
            if self.daemons:
                self.start_daemons()
        except BaseException:
            self.close()
            raise
        return self

    def _add_ns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._namespaces.append(name)
        _run(["ip", "link", "set", "lo", "up"], ns=name)

    def _build(self) -> None:
        self._add_ns(self.bridge_ns)
        _run(["ip", "link", "add", "br0", "type", "bridge"], ns=self.bridge_ns)
        _run(["ip", "link", "set", "br0", "up"], ns=self.bridge_ns)
        for k, (ns, address) in enumerate([(self.client_ns, CLIENT_ADDRESS), *((h.ns, h.address) for h in self.hosts)]):
            self._add_ns(ns)
            inner, outer = f"{self.prefix}a{k}", f"{self.prefix}b{k}"
            # created in the root namespace and moved at once: the names never linger there
            _run(["ip", "link", "add", inner, "netns", ns, "type", "veth", "peer", "name", outer,
                  "netns", self.bridge_ns])
            _run(["ip", "link", "set", outer, "master", "br0", "up"], ns=self.bridge_ns)
            _run(["ip", "link", "set", inner, "name", "eth0"], ns=ns)
            _run(["ip", "addr", "add", f"{address}/16", "dev", "eth0"], ns=ns)
            _run(["ip", "link", "set", "eth0", "up"], ns=ns)
            if ns == self.client_ns:
                continue
            setup = ["-N MLF-IN", "-N MLF-OUT", "-N MLF-LOSS", "-A INPUT -j MLF-LOSS", "-A INPUT -j MLF-IN",
                     "-A OUTPUT -j MLF-OUT"]
            _run(["iptables-restore", "--noflush"], ns=ns, stdin="*filter\n" + "\n".join(setup) + "\nCOMMIT\n")
            if self.tcp_retries2 is not None:
                _run(["sysctl", "-q", "-w", f"net.ipv4.tcp_retries2={self.tcp_retries2}"], ns=ns)

    def spawn(self, index: int, argv: Sequence[str], env: dict[str, str] | None = None,
              log: Path | None = None, inherit_env: bool = True) -> subprocess.Popen[bytes]:
        """Run ``argv`` in host ``index``'s namespace (its own session; output to ``log``, default the
        host's log). Its environment: ours, the testbed's ``env``, then ``env``; with
        ``inherit_env=False`` exactly ``env``."""
        host = self.hosts[index]
        host.workdir.mkdir(parents=True, exist_ok=True)
        log = log or host.log
        full_env = {**os.environ, **self.env, **(env or {})} if inherit_env else dict(env or {})
        with open(log, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", host.ns, *argv], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=full_env, start_new_session=True, close_fds=True)
        self._extra.append(proc)
        return proc

    def node_argv(self, index: int, seed: str | None) -> list[str]:
        host = self.hosts[index]
        argv = [*_mlfabric_argv(), "node", "--preset", self.preset, "--listen", host.listen,
                "--control", f"{host.address}:{CONTROL_PORT}", "--data-dir", str(host.workdir / "data")]
        if seed:
            argv += ["--seed", seed]
        return argv + self.node_args

    def start_daemons(self, indices: Iterable[int] | None = None) -> None:
        """Start daemons (node 0 first, then the rest through it) and wait until all listen."""
        chosen = list(range(self.n) if indices is None else indices)
        first = [i for i in chosen if i == 0]
        rest = [i for i in chosen if i != 0]
        for batch in (first, rest):
            for i in batch:
                host = self.hosts[i]
                seed = None if i == 0 else self.hosts[0].listen
                with contextlib.suppress(FileNotFoundError):
                    host.log.unlink()
                host.proc = self.spawn(i, self.node_argv(i, seed))
            self.wait_ready(batch)

    def wait_ready(self, indices: Iterable[int], timeout: float | None = None) -> None:
        """Wait for the ready line of each host's daemon (fails fast if one exits)."""
        pending = set(indices)
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        while pending:
            for i in sorted(pending):
                host = self.hosts[i]
                with contextlib.suppress(OSError):
                    m = READY_RE.search(host.log.read_bytes())
                    if m is not None:
                        host.id, host.control = int(m.group(1), 16), m.group(3).decode()
                        chost, _, cport = host.control.rpartition(":")
                        if chost in ("0.0.0.0", "[::]", "::"):  # a wildcard: reach it at the host's address
                            host.control = f"{host.address}:{cport}"
                        pending.discard(i)
                        continue
                if host.proc is not None and host.proc.poll() is not None:
                    raise TestbedError(f"node {i} exited with code {host.proc.returncode}: {self.tail(i)}")
            if pending and time.monotonic() > deadline:
                raise TestbedError(f"{len(pending)} node(s) not ready in time; node {min(pending)}: "
                                   f"{self.tail(min(pending))}")
            if pending:
                time.sleep(0.05)

    def tail(self, index: int, lines: int = 5) -> str:
        try:
            text = self.hosts[index].log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def stop(self, index: int, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Signal host ``index``'s daemon and wait for it to exit (SIGKILL after ``timeout``)."""
        proc = self.hosts[index].proc
        if proc is None:
            return
        _signal_group(proc, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(5.0)

    def close(self) -> None:
        """Kill every process we started, delete every namespace. Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        _LIVE.discard(self)
        if self._agent is not None:
            with contextlib.suppress(Exception):
                self._agent.kill()
                self._agent.wait(5.0)
            for stream in (self._agent.stdin, self._agent.stdout):
                with contextlib.suppress(Exception):
                    if stream is not None:
                        stream.close()
        procs = [p for p in self._extra if p.poll() is None]
        for p in procs:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.poll() is None:
                _signal_group(p, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5.0)
        for ns in reversed(self._namespaces):
            _delete_namespace(ns)
        self._namespaces.clear()
        if self._own_workdir and not os.environ.get("MLFABRIC_TESTBED_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------ faults

    def down(self, index: int) -> None:
        """Cut host ``index`` off: its link goes down (its processes keep running)."""
        _run(["ip", "link", "set", "eth0", "down"], ns=self.hosts[index].ns)

    def up(self, index: int) -> None:
        _run(["ip", "link", "set", "eth0", "up"], ns=self.hosts[index].ns)

    def partition(self, groups: Iterable[Iterable[int]]) -> None:
        """Split the hosts into groups that cannot reach each other (hosts in no group keep reaching
        everyone; the client namespace always reaches everyone). Replaces an earlier partition."""
        groups = [sorted(set(g)) for g in groups]
        member = {i: k for k, g in enumerate(groups) for i in g}
        for i, host in enumerate(self.hosts):
            if i not in member:
                self._set_chain(host.ns, [], [])
                continue
            others = [self.hosts[j].address for j in member if member[j] != member[i]]
            self._set_chain(host.ns, [f"-A MLF-IN -s {a}/32 -j DROP" for a in others],
                            [f"-A MLF-OUT -d {a}/32 -j DROP" for a in others])

    def heal(self) -> None:
        """Remove the partition (loss and rate limits stay)."""
        for host in self.hosts:
            self._set_chain(host.ns, [], [])

    def loss(self, index: int, p: float) -> None:
        """Drop a random fraction ``p`` of host ``index``'s incoming packets (0 removes the loss)."""
        if not 0.0 <= p <= 1.0:
            raise TestbedError("loss probability must be in [0, 1]")
        rules = ["-F MLF-LOSS"]
        if p > 0:
            rules.append(f"-A MLF-LOSS -m statistic --mode random --probability {p:.6f} -j DROP")
        _run(["iptables-restore", "--noflush"], ns=self.hosts[index].ns,
             stdin="*filter\n" + "\n".join(rules) + "\nCOMMIT\n")

    def rate(self, index: int, rate: str | None, burst: str = "32kbit", latency: str = "400ms") -> None:
        """Limit host ``index``'s outgoing bandwidth with tbf (``rate`` like '10mbit'; None removes it)."""
        ns = self.hosts[index].ns
        if rate is None:
            _run(["tc", "qdisc", "del", "dev", "eth0", "root"], ns=ns, check=False)
            return
        _run(["tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst", burst,
              "latency", latency], ns=ns)

    def _set_chain(self, ns: str, inbound: list[str], outbound: list[str]) -> None:
        script = "\n".join(["*filter", "-F MLF-IN", "-F MLF-OUT", *inbound, *outbound, "COMMIT", ""])
        _run(["iptables-restore", "--noflush"], ns=ns, stdin=script)

    # ------------------------------------------------------------------ queries (from the client namespace)

    @property
    def controls(self) -> list[str]:
        return [h.control or f"{h.address}:{CONTROL_PORT}" for h in self.hosts]

    def _ask(self, request: dict[str, Any], timeout: float = 60.0) -> Any:
        if self._agent is None or self._agent.poll() is not None:
            self._agent = subprocess.Popen(
                ["ip", "netns", "exec", self.client_ns, sys.executable, "-u", str(Path(__file__).resolve()), "agent"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert self._agent.stdin is not None and self._agent.stdout is not None
        self._agent.stdin.write(json.dumps(request) + "\n")
        self._agent.stdin.flush()
        line = _readline(self._agent.stdout, timeout)
        if not line:
            raise TestbedError(f"client agent gave no answer to {request.get('op')}")
        answer = json.loads(line)
        if "error" in answer:
            raise TestbedError(f"client agent: {answer['error']}")
        return answer["result"]

    def statuses(self, indices: Iterable[int] | None = None, timeout: float = 3.0) -> list[dict[str, Any] | None]:
        """GET /status of each node (None where it did not answer), asked from the client namespace."""
        chosen = list(range(self.n) if indices is None else indices)
        return self._ask({"op": "statuses", "controls": [self.controls[i] for i in chosen], "timeout": timeout})

    def lookups(self, indices: Iterable[int], keys_per_node: int, seed: int = 0,
                ids: list[int] | None = None, timeout: float = 5.0) -> dict[str, Any]:
        """Random keys looked up from each chosen node, checked against the true successor among ``ids``
        (default: those nodes' ids)."""
        chosen = list(indices)
        ids = ids if ids is not None else [self.hosts[i].id for i in chosen]
        return self._ask({"op": "lookups", "controls": [self.controls[i] for i in chosen], "ids": ids,
                          "keys_per_node": keys_per_node, "seed": seed, "timeout": timeout})

    def run_in_client(self, argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run a command in the client namespace (``mlfabric status --node …``, say)."""
        return subprocess.run(["ip", "netns", "exec", self.client_ns, *argv], capture_output=True, text=True,
                              timeout=timeout)


# ---------------------------------------------------------------------- helpers


def _readline(stream: IO[str], timeout: float) -> str:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise TestbedError(f"client agent silent for {timeout:g}s")
        return stream.readline()
    finally:
        sel.close()


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _delete_namespace(ns: str) -> None:
    """Kill what still runs inside ``ns`` (it is ours: the name carries our prefix), then delete it."""
    for _ in range(3):
        pids = _run(["ip", "netns", "pids", ns], check=False).split()
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.1)
    _run(["ip", "netns", "del", ns], check=False)


def cleanup(prefix: str = "mf") -> list[str]:
    """Remove every namespace (and its processes) and root-namespace link named ``<prefix>…``."""
    if not PREFIX_RE.match(prefix):
        raise TestbedError(f"prefix {prefix!r}: 2-8 lowercase letters and digits, a letter first")
    ours_ns = re.compile(rf"^{prefix}[0-9a-f]*-(br|c|n[0-9]+)$")
    ours_link = re.compile(rf"^{prefix}[0-9a-f]*[ab][0-9]+$")
    removed = []
    for line in _run(["ip", "netns", "list"], check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        if ours_ns.match(name):
            _delete_namespace(name)
            removed.append(name)
    for line in _run(["ip", "-o", "link", "show"], check=False).splitlines():
        parts = line.split(": ")
        if len(parts) > 1:
            name = parts[1].split("@")[0]
            if ours_link.match(name):
                _run(["ip", "link", "del", name], check=False)
                removed.append(name)
    return removed


def _close_all() -> None:
    for tb in list(_LIVE):
        tb.close()


atexit.register(_close_all)


def install_signal_handlers() -> None:
    """SIGTERM (and SIGHUP) raise SystemExit, so ``with`` blocks and atexit clean up as for Ctrl-C."""
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


# ---------------------------------------------------------------------- the client agent


def _agent_main() -> int:
    """Runs in the client namespace: one JSON request per stdin line, one JSON answer per stdout line."""
    from mlfabric.runtime.cluster import check_lookups, fetch_statuses

    for line in sys.stdin:
        try:
            req = json.loads(line)
            if req["op"] == "statuses":
                result: Any = asyncio.run(fetch_statuses(req["controls"], timeout=req["timeout"]))
            elif req["op"] == "lookups":
                result = asyncio.run(check_lookups(req["controls"], req["ids"], req["keys_per_node"],
                                                   seed=req["seed"], timeout=req["timeout"]))
            else:
                raise ValueError(f"unknown op {req['op']!r}")
            print(json.dumps({"result": result}), flush=True)
        except Exception as exc:  # the agent must answer every line
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
    return 0


# ---------------------------------------------------------------------- CLI


def _groups(text: str) -> list[list[int]]:
    return [[int(x) for x in g.split(",") if x] for g in text.split("/")]


def _interactive(tb: Testbed) -> None:
    print(json.dumps({"prefix": tb.prefix, "client_namespace": tb.client_ns,
                      "nodes": [{"ns": h.ns, "address": h.listen, "control": h.control, "id": f"{h.id or 0:016x}"}
                                for h in tb.hosts]}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        try:
            match words:
                case ["status"]:
                    from mlfabric.runtime.cluster import ring_report

                    print(json.dumps(ring_report(tb.statuses())), flush=True)
                case ["partition", spec]:
                    tb.partition(_groups(spec))
                case ["heal"]:
                    tb.heal()
                case ["down", i]:
                    tb.down(int(i))
                case ["up", i]:
                    tb.up(int(i))
                case ["loss", i, p]:
                    tb.loss(int(i), float(p))
                case ["rate", i, r]:
                    tb.rate(int(i), None if r == "off" else r)
                case ["quit"] | ["exit"]:
                    return
                case _:
                    print("commands: status | partition 0,1/2,3 | heal | down I | up I | loss I P | "
                          "rate I RATE|off | quit", file=sys.stderr)
                    continue
            print("ok", flush=True)
        except TestbedError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="testbed.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build N hosts, start the daemons, read commands from stdin")
    up.add_argument("--nodes", type=int, required=True)
    up.add_argument("--preset", default="local")
    up.add_argument("--prefix", default=None)
    clean = sub.add_parser("cleanup", help="remove leftover namespaces, links and processes")
    clean.add_argument("--prefix", default="mf")
    sub.add_parser("agent", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cmd == "agent":
        return _agent_main()
    if (why := unavailable()) is not None:
        print(f"testbed.py: {why}", file=sys.stderr)
        return 2
    if args.cmd == "cleanup":
        for name in cleanup(args.prefix):
            print(f"removed {name}")
        return 0
    install_signal_handlers()
    kw = {"prefix": args.prefix} if args.prefix else {}
    try:
        with Testbed(args.nodes, preset=args.preset, **kw).start() as tb:
            _interactive(tb)
    except TestbedError as exc:
        print(f"testbed.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

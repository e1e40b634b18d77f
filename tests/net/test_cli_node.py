"""`mlfabric node` as a real process: ready line, no torch, JSON logs, SIGINT, and one-line config errors."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mlfabric.runtime.control import get_json

pytestmark = pytest.mark.net


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mlfabric", *args], capture_output=True, text=True, timeout=30,
                          check=False)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--listen", "bad"], "listen: address 'bad' must be host:port"),
        (["--seed", "nowhere"], "seeds"),
        (["--config", "/nonexistent/mlfabric.toml"], "cannot read config file"),
        (["--cluster-key-file", "/nonexistent/key", "--listen", "127.0.0.1:0"], "cannot read cluster_key_file"),
    ],
)
def test_config_errors_exit_2_with_one_line(tmp_path: Path, args: list[str], fragment: str) -> None:
    done = run_cli("node", "--data-dir", str(tmp_path), *args)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlfabric: ") and fragment in lines[0], done.stderr


async def test_node_process_serves_without_torch_and_stops_on_sigint(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mlfabric", "node", "--preset", "local", "--listen", "127.0.0.1:0",
        "--data-dir", str(tmp_path / "n"), "--log-format", "json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(15):
            line = (await proc.stdout.readline()).decode()
        words = line.split()
        assert words[:2] == ["mlfabric", "node"] and words[3:5] == ["listening", "on"] and words[6] == "control"
        control = words[7]
        assert (tmp_path / "n" / "control").read_text().strip() == control
        code, status = await get_json(control, "/status")
        assert code == 200 and status["torch_loaded"] is False and f"{status['id']:016x}" == words[2]
        assert status["address"] == words[5] and status["joined"] is True
        code, body = await get_json(control, "/lookup?key=42")
        assert code == 200 and body["node"]["id"] == status["id"]  # alone: it owns every key
        for path, want in (("/lookup?key=x", 400), ("/lookup", 400), ("/nope", 404)):
            assert (await get_json(control, path))[0] == want
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(15):
            _, err = await proc.communicate()
        assert proc.returncode == 0
        records = [json.loads(x) for x in err.decode().splitlines()]  # every log line is a JSON object
        assert any(r["msg"] == "node stopped" for r in records)
        assert not (tmp_path / "n" / "control").exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "mlfabric", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_job_submit_and_status_through_the_cli(daemon_factory, wait_until) -> None:
    """`mlfabric job submit` (the task's default rounds), `mlfabric job status` (table and JSON) against a
    one-node ring; the shard options are gone (one flat tensor per payload)."""
    node = await daemon_factory()
    control = node.control_address
    rc, out, err = await _cli("job", "submit", "--node", control, "--task", "mlfabric.learn.probe:IndexTask",
                              "--job-id", "cli-probe")
    assert rc == 0, err
    assert out.startswith("job cli-probe submitted (3 rounds); coordinator ") and f"{node.node_id:016x}" in out
    assert node.jobs is not None
    await wait_until(lambda: (v := node.jobs.status("cli-probe")["jobs"].get("cli-probe")) is not None  # type: ignore[union-attr]
                     and v["status"] == "done" and v["host"]["model_version"] == 3, timeout=30, what="job done")
    rc, out, err = await _cli("job", "status", "--node", control, "--job", "cli-probe")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == ("job cli-probe: done (coordinator), task mlfabric.learn.probe:IndexTask, 3/3 rounds "
                        "recorded, model version 3 here, attempt 0"), out
    rows = [ln.split() for ln in lines[2:5]]
    assert [r[:3] for r in rows] == [["0", "1", "1"], ["1", "1", "1"], ["2", "1", "1"]], out  # round, updates, members
    assert all(r[3] == "1.0000" for r in rows), out  # the probe's test loss is its model's mean: part 0 + 1
    rc, out, _ = await _cli("job", "status", "--node", control, "--json")
    assert rc == 0 and [h["round"] for h in json.loads(out)["jobs"]["cli-probe"]["history"]] == [0, 1, 2]
    rc, _, err = await _cli("job", "submit", "--node", control, "--shard-bytes", "4096")
    assert rc == 2 and "unrecognized arguments: --shard-bytes" in err
    rc, _, err = await _cli("job", "submit", "--node", control, "--task", "nope:Task", "--job-id", "x")
    assert rc == 1 and err.strip().startswith("mlfabric: job not submitted: task 'nope:Task' is not in this node's")

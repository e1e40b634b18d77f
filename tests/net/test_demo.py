"""`mlfabric demo`: 8 real daemons form the ring, answer lookups correctly, repair after SIGTERM, in < 1 minute."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.net


def test_demo_runs_end_to_end(tmp_path) -> None:
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "mlfabric", "demo", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "ideal ring after" in out and "ring repaired" in out and out.rstrip().endswith("OK")
    assert "128/128 lookups returned the true successor" in out
    assert "112/112 lookups returned the true successor" in out
    assert time.monotonic() - t0 < 60

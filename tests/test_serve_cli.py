"""`disagg serve` as a user runs it: a real launcher process, real router and worker processes under it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from worker.ports import free_port

pytestmark = pytest.mark.cluster  # starts real router/worker processes (or Ray): not in the fast tier


def children_of(pid: int) -> list[int]:
    """Direct children of `pid`, read from /proc (Linux)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigterm_stops_every_process_of_the_cluster(tmp_path: Path) -> None:
    """A worker killed with -9 is restarted and the launcher goes on; SIGTERM (kill, systemd, docker stop) stops
    the router and the workers too, as Ctrl-C does."""
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "model": "smollm2", "engine": {"cache": {"num_blocks": 64}}, "transfer": {"backend": "tcp"},
        "pools": {"prefill": {"replicas": 1}, "decode": {"replicas": 1}}}))
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "serve", "--config", str(config), "--quiet",
                             "--port", str(free_port()), "--log-dir", str(tmp_path / "logs")],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    kids: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while "Ready:" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        kids += children_of(proc.pid)
        assert len(kids) == 3, f"router + 2 workers expected, got {kids}"
        # kill -9 of a worker stops nothing: the launcher restarts it (issue 20: it used to stop the cluster).
        [decode] = [k for k in kids if "decode" in Path(f"/proc/{k}/cmdline").read_text()]
        os.kill(decode, signal.SIGKILL)
        while not (back := [k for k in children_of(proc.pid) if k not in kids]):
            assert proc.poll() is None and time.monotonic() < deadline + 120, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        kids += back
        assert "decode" in Path(f"/proc/{back[0]}/cmdline").read_text()
        assert "restarting it in" in (tmp_path / "serve.log").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        time.sleep(0.5)
        assert [k for k in kids if alive(k)] == [], "processes outlived the launcher"
        assert "Stopped." in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        for k in set(kids + children_of(proc.pid)):  # orphans of a failed run must not outlive the test
            if alive(k):
                os.kill(k, signal.SIGKILL)

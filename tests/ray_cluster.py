"""A real `ray start --head` cluster for tests (started from this venv on free ports, stopped by its own process ids
only), and a look at what it holds through Ray's own tables."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _descendants(root: int) -> set[int]:
    """Every live process whose parent chain leads to `root` (the `ray start --block` we launched)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def head_node() -> Iterator[dict]:
    """`ray start --head --block` from this venv (so the job's `python` is the venv's), on free ports."""
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # unix socket paths must stay short
    gcs, dashboard, *others = _free_ports(9)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # stop at once on SIGTERM (no 30 s drain)
    }
    env.pop("RAY_ADDRESS", None)
    flags = [
        "--ray-client-server-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
        "--node-manager-port",
        "--object-manager-port",
    ]
    cmd = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus",
        "2",
        "--port",
        str(gcs),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--include-dashboard",
        "true",
        "--temp-dir",
        temp_dir,
        "--disable-usage-stats",
    ]
    for flag, port in zip(flags, others, strict=True):
        cmd += [flag, str(port)]
    log = open(f"{temp_dir}.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray start --head did not come up: {Path(temp_dir + '.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield {"url": url, "env": env, "address": f"127.0.0.1:{gcs}"}
    finally:
        started = _descendants(proc.pid) | {proc.pid}
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        time.sleep(2)
        for pid in sorted(started):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        Path(f"{temp_dir}.log").unlink(missing_ok=True)
        assert not [pid for pid in started if _alive(pid)], "processes of our head node survived"


CLUSTER_PROBE = """
import json, ray
ray.init(address="auto", logging_level="ERROR")
held = {k: v["state"] for k, v in ray.util.placement_group_table().items() if v["state"] != "REMOVED"}
free, total = ray.available_resources().get("CPU", 0), ray.cluster_resources()["CPU"]
print(json.dumps({"held": held, "free": free, "total": total}))
"""


def cluster_is_free(head_node: dict, timeout_s: float = 60) -> dict:
    """Ray's own placement-group table and resources of the cluster, polled until nothing is held (or timeout)."""
    env = {**head_node["env"], "RAY_ADDRESS": head_node["address"]}
    deadline = time.monotonic() + timeout_s
    while True:
        probe = subprocess.run([sys.executable, "-c", CLUSTER_PROBE], env=env, capture_output=True, text=True)
        assert probe.returncode == 0, probe.stderr[-2000:]
        state = json.loads(probe.stdout.strip().splitlines()[-1])
        if (not state["held"] and state["free"] == state["total"]) or time.monotonic() > deadline:
            return state
        time.sleep(1)

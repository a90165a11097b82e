"""Slow-body clients against the served app: does the front end still answer others, in bounded memory?

Starts the Serve application on localhost (a given checkpoint + index, or serve_bench's tiny model), opens `--slow`
connections that each announce a 1 MB multipart body and then trickle one byte a second, and while they are held
measures `/healthz` and a text `POST /search` from another client (latency p50 / p99 / max), the Ingress replica's
and the HTTP proxy's resident memory, and finally what each slow client was answered (408 once
`serve.body_timeout_s` passed). Traffic goes to 127.0.0.1 only; every loop is bounded. Prints one JSON document and
writes it to bench/results/slow_clients.json.

    python bench/slow_clients.py --slow 300 --hold-s 20 --body-timeout-s 25
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
logger = logging.getLogger("slow_clients")


def rss_mib(title: str) -> float:
    """Summed resident memory of the processes whose command line contains `title` (Ray retitles its actors)."""
    import psutil

    total = 0
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        if title in " ".join(proc.info.get("cmdline") or []) and proc.info.get("memory_info"):
            total += proc.info["memory_info"].rss
    return round(total / 2**20, 1)


async def slow_client(port: int, hold_s: float, deadline_s: float) -> str:
    """Announce a 1 MB body, send it a byte a second; return the status line the server answered (or why none)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as err:
        return f"connect failed: {err.__class__.__name__}"
    head = (
        "POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        "Content-Length: 1000000\r\n\r\n--b\r\n"
    )
    writer.write(head.encode())
    start = time.monotonic()
    status = "no answer"
    try:
        while time.monotonic() - start < deadline_s:
            try:
                line = await asyncio.wait_for(reader.readline(), 1.0)
                status = line.decode(errors="replace").strip() or "closed"
                break
            except TimeoutError:
                if time.monotonic() - start < hold_s:
                    writer.write(b"x")
                    await writer.drain()
    except OSError as err:
        status = f"reset: {err.__class__.__name__}"
    writer.close()
    return status


async def probe(url: str, seconds: float) -> dict[str, Any]:
    """`/healthz` and a text search, one after the other, for `seconds`: their latencies."""
    import httpx

    times: dict[str, list[float]] = {"healthz": [], "search": []}
    failures: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for name, call in (
                ("healthz", lambda: client.get("/healthz")),
                ("search", lambda: client.post("/search", data={"target": "image", "text": "a red circle", "k": "5"})),
            ):
                start = time.perf_counter()
                try:
                    r = await call()
                    if r.status_code != 200:
                        failures.append(f"{name} {r.status_code}")
                except httpx.HTTPError as err:
                    failures.append(f"{name} {err.__class__.__name__}")
                times[name].append(time.perf_counter() - start)
            await asyncio.sleep(0.2)
    return {name: _summary(values) for name, values in times.items()} | {"failures": failures}


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(values),
        "p50_s": round(statistics.median(ordered), 4),
        "p99_s": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 4),
        "max_s": round(ordered[-1], 4),
    }


async def scenario(url: str, port: int, args: argparse.Namespace) -> dict[str, Any]:
    before = {"ingress_mib": rss_mib("ServeReplica:cman:Ingress"), "proxy_mib": rss_mib("ProxyActor")}
    slow = [asyncio.create_task(slow_client(port, args.hold_s, args.body_timeout_s + 30)) for _ in range(args.slow)]
    await asyncio.sleep(2.0)  # every slow connection open and announced
    measured = await probe(url, args.hold_s)
    during = {"ingress_mib": rss_mib("ServeReplica:cman:Ingress"), "proxy_mib": rss_mib("ProxyActor")}
    answers = await asyncio.gather(*slow)
    counts: dict[str, int] = {}
    for answer in answers:
        counts[answer] = counts.get(answer, 0) + 1
    return {"while_held": measured, "memory_before": before, "memory_while_held": during, "slow_answers": counts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="CMAN checkpoint (default: train serve_bench's tiny one)")
    parser.add_argument("--index", help="index directory for --checkpoint")
    parser.add_argument("--slow", type=int, default=300, help="slow-body connections held open")
    parser.add_argument("--hold-s", type=float, default=20.0, help="how long they trickle (and the probe runs)")
    parser.add_argument("--body-timeout-s", type=float, default=25.0, help="serve.body_timeout_s for the run")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "slow_clients.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import ray
    from ray import serve
    from serve_bench import tiny_model

    from serve_app.app import ServeArgs, build_app

    work = Path(tempfile.mkdtemp(prefix="slow_clients_"))
    checkpoint, index = (Path(args.checkpoint), Path(args.index)) if args.checkpoint else tiny_model(work)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = {"body_timeout_s": args.body_timeout_s}
        serve.run(build_app(ServeArgs(checkpoint=str(checkpoint), index_dir=str(index), serve=settings)), name="cman")
        report = {"benchmark": "slow_clients", "slow": args.slow, "hold_s": args.hold_s, **settings}
        report |= asyncio.run(scenario(url, port, args))
    finally:
        serve.shutdown()
        ray.shutdown()
    text = json.dumps(report, indent=2)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Serving benchmark: QPS and latency of `POST /search` at several concurrencies, with batching on vs off.

Starts the Serve application on localhost (a given checkpoint + index, or a tiny freshly trained one), fires a bounded
number of concurrent text (and image) searches with httpx at each concurrency, and reads the encoders' batch-size
counters from `GET /stats`. Prints one JSON document and writes it to bench/results/serve_bench.json.

    python bench/serve_bench.py                               # tiny model built on the fly (~2 min)
    python bench/serve_bench.py --checkpoint outputs/quickstart/best --index outputs/quickstart/index
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
logger = logging.getLogger("serve_bench")


def tiny_model(work: Path) -> tuple[Path, Path]:
    """A small demo dataset, 2 epochs of in-process training and its test-split index."""
    from cman.config import load_config
    from cman.data.demo import generate_demo_dataset
    from cman.training import fit
    from jobs.build_index import build_index

    root = work / "data"
    generate_demo_dataset(root, counts={"train": 32, "val": 8, "test": 32})
    overrides = {"data.root": str(root), "training.epochs": 2, "training.batch_size": 16, "output_dir": str(work)}
    fit(load_config(REPO / "configs" / "demo.yaml", overrides), work / "run", resume=False, progress=False)
    checkpoint = work / "run" / "checkpoints" / "best"
    build_index(checkpoint, "test", work / "index", root=root)
    return checkpoint, work / "index"


def queries(index_dir: Path, kind: str) -> list[dict[str, Any]]:
    """Form data + files for `kind` queries, taken from the gallery items (captions / image files)."""
    from cman.gallery_mirror import open_gallery
    from cman.modality import Modality

    records = open_gallery(index_dir)[Modality.TEXT].records()
    if kind == "text":
        return [{"data": {"text": r["caption"], "target": "image", "k": "10"}} for r in records if r.get("caption")]
    out = []
    for r in records[:32]:
        path = Path(r["image_path"]) if Path(r["image_path"]).is_absolute() else index_dir / r["image_path"]
        out.append({"data": {"target": "text", "k": "10"}, "files": {"image": (path.name, path.read_bytes())}})
    return out


async def fire(url: str, bodies: list[dict[str, Any]], concurrency: int, total: int, max_s: float) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    errors = 0
    sem = asyncio.Semaphore(concurrency)
    deadline = time.perf_counter() + max_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one(i: int) -> None:
            nonlocal errors
            async with sem:
                if time.perf_counter() > deadline:
                    return
                body = bodies[i % len(bodies)]
                start = time.perf_counter()
                response = await client.post("/search", data=body["data"], files=body.get("files"))
                latencies.append(time.perf_counter() - start)
                errors += response.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(total)))
        elapsed = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "requests": len(latencies),
        "errors": errors,
        "qps": round(len(latencies) / elapsed, 2),
        "p50_ms": round(1000 * statistics.median(ordered), 1),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
    }


def mean_batch(url: str, encoder: str) -> float:
    import httpx

    stats = httpx.get(f"{url}/stats", timeout=60).json()["encoders"][encoder]
    return round(stats["requests"] / max(stats["batches"], 1), 2)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import httpx
    import ray
    from ray import serve

    from serve_app.app import ServeArgs, build_app

    work = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    checkpoint, index = (Path(args.checkpoint), Path(args.index)) if args.checkpoint else tiny_model(work)
    ray.init(num_cpus=args.cpus, include_dashboard=False, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows = []
    try:
        for batch_size in (args.max_batch_size, 1):
            overrides = {"max_batch_size": batch_size, "batch_wait_timeout_s": args.batch_wait_s}
            start = time.perf_counter()
            serve.run(
                build_app(ServeArgs(checkpoint=str(checkpoint), index_dir=str(index), serve=overrides)),
                name="cman",
                route_prefix="/",
            )
            logger.info("serve.run (max_batch_size=%d) took %.1f s", batch_size, time.perf_counter() - start)
            for kind in args.kinds:
                bodies = queries(index, kind)
                asyncio.run(fire(url, bodies, 4, 8, 30))  # warm-up
                for concurrency in args.concurrency:
                    httpx.post(f"{url}/stats/reset", timeout=60)
                    total = max(args.requests, concurrency * 2)
                    result = asyncio.run(fire(url, bodies, concurrency, total, args.max_seconds))
                    row = {
                        "batching": batch_size > 1,
                        "max_batch_size": batch_size,
                        "query": kind,
                        "concurrency": concurrency,
                        **result,
                        "mean_batch_size": mean_batch(url, kind),
                    }
                    logger.info("%s", row)
                    rows.append(row)
            serve.delete("cman")
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="CMAN checkpoint (default: train a tiny one)")
    parser.add_argument("--index", help="index directory for --checkpoint")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time cap per level")
    parser.add_argument("--kinds", nargs="+", choices=["text", "image"], default=["text", "image"])
    parser.add_argument("--max-batch-size", type=int, default=16, help="batching-on setting (off is 1)")
    parser.add_argument("--batch-wait-s", type=float, default=0.01)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "serve_bench.json"))
    args = parser.parse_args(argv)
    if bool(args.checkpoint) != bool(args.index):
        parser.error("--checkpoint and --index go together")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    rows = run(args)
    report = {"benchmark": "serve_search", "cpus": args.cpus, "results": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

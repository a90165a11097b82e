"""`cman quickstart`, beside the other Ray runners: the main job, offline — demo data → sweep → index → serve.

Everything lands in OUTPUT_DIR: `data/` (embedded dataset), the sweep (`tune/`, `trials/`, `mlflow.db`, `best/` with
`eval_test.json`), `index/`. Re-running reuses what is already there (dataset, finished sweep, index). OUTPUT_DIR may
be a storage URI (`jobs.storage`): then only the sweep's Ray results (`tune/`, `trials/`) go there and the rest to the
local folder (`--local-dir`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cman.api import bundled_config
from cman.config import CMANConfig, load_config
from jobs.storage import RunLocation, locate

logger = logging.getLogger(__name__)

DEMO_CONFIG = bundled_config("demo.yaml")  # the repo's configs/demo.yaml, or the installed package data
# The baseline (the config's own values) and one Optuna trial that ASHA may stop after `tune.grace_period` epochs:
# each further trial costs ~35 s of Ray Train start-up plus its epochs, ~75 s in all on 2 cores (README, "What the
# quickstart gives"); `--num-samples` asks for more.
QUICKSTART_TRIALS = 2


def ensure_dataset(data_dir: Path, counts: dict[str, int] | None = None) -> None:
    from cman.data.demo import generate_demo_dataset

    if (data_dir / "metadata" / "test_metadata.json").is_file():
        logger.info("demo dataset already in %s (reused)", data_dir)
        return
    counts = generate_demo_dataset(data_dir, counts=counts)
    logger.info("demo dataset written to %s: %s", data_dir, counts)


def tracking_hint(config: CMANConfig, output_dir: Path) -> str:
    from jobs.tracking import tracking_uri

    return f"mlflow ui --backend-store-uri {tracking_uri(config.mlflow.tracking_uri, output_dir)}"


def train_best(config: CMANConfig, where: RunLocation) -> tuple[Path, dict[str, Any]]:
    """Run the sweep (or reuse a finished one); return the best checkpoint and its test result."""
    best = where.local_dir / "best"
    if (best / "eval_test.json").is_file():
        logger.info("finished sweep found in %s (reused; delete it to start over)", where.local_dir)
        return best, json.loads((best / "eval_test.json").read_text())
    from tuning.sweep import EXPERIMENT_DIR, run_sweep

    resume = where.exists(EXPERIMENT_DIR)
    logger.info("tune sweep: %d trials (%s)", config.tune.num_samples, "resuming" if resume else "new")
    local_dir = where.local_dir if where.remote else None
    summary = run_sweep(config, where.output, resume=resume, local_dir=local_dir)
    return Path(summary["best_checkpoint"]), summary["test"]


def quickstart(
    output_dir: str | Path,
    num_samples: int | None = None,
    serve: bool = True,
    port: int = 8000,
    overrides: dict[str, Any] | None = None,
    dataset_counts: dict[str, int] | None = None,
    local_dir: str | Path | None = None,
) -> dict:
    """Demo data → sweep → index → print the test table → serve (if `serve`). Returns paths and the test result.

    `overrides` (config keys) and `dataset_counts` (items per split) shrink the run for smoke tests. `output_dir` may
    be a storage URI for the sweep's Ray results; the rest then goes to `local_dir` (`jobs.storage.locate`).
    """
    from jobs import cluster

    where = locate(output_dir, local_dir)  # a bad URI is one clear error before Ray starts
    start = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        # the dataset (espeak-ng speech, rendered images: ~8 s) is made while Ray starts (~10-15 s, mostly waiting)
        dataset = pool.submit(ensure_dataset, where.local_dir / "data", dataset_counts)
        with cluster.session():  # one Ray (with its dashboard) for the sweep, the index and serving
            dataset.result()
            return _run(where, num_samples, serve, port, overrides, start)


def _run(
    where: RunLocation,
    num_samples: int | None,
    serve: bool,
    port: int,
    overrides: dict[str, Any] | None,
    start: float,
) -> dict:
    from cman.metrics import format_table
    from jobs import cluster
    from jobs.build_index import build_index

    output_dir = where.local_dir
    data_dir = output_dir / "data"
    settings = {
        "data.root": str(data_dir),
        "output_dir": where.output,
        "tune.num_samples": num_samples or QUICKSTART_TRIALS,
        # features (fbank, resized images, tokens) computed once and shared by every trial's worker, not per trial
        "data.cache_dir": str(output_dir / "feature_cache"),
    }
    config = load_config(DEMO_CONFIG, {**settings, **(overrides or {})})
    cpus = os.cpu_count() or 1
    if config.tune.cpus_per_trial > cpus and cluster.cluster_address() is None:  # a trial that could never start
        config = config.with_overrides({"tune.cpus_per_trial": cpus})
    best, test = train_best(config, where)
    trained = time.perf_counter() - start
    index_dir = output_dir / "index"
    if not (index_dir / "index_meta.json").is_file() or _stale(index_dir, best):
        split, kind = config.data.test_split, config.serve.index_kind
        counts = build_index(best, split, index_dir, root=data_dir, kind=kind, progress=cluster.is_verbose())
    else:
        counts = json.loads((index_dir / "index_meta.json").read_text())["counts"]
    print(
        f"\nquickstart: data -> sweep -> index done in {time.perf_counter() - start:.0f} s "
        f"(training part {trained:.0f} s)"
    )
    print(f"best checkpoint: {best}\nindex: {index_dir} {counts}")
    print(f"test split ({config.data.test_split}) of the best checkpoint:\n{format_table(test)}")
    print(f"MLflow: {tracking_hint(config, output_dir)}")
    if cluster.dashboard_url():
        print(f"Ray dashboard: {cluster.dashboard_url()}")
    result = {"checkpoint": str(best), "index": str(index_dir), "counts": counts, "test": test}
    if serve:
        from serve_app.run import serve_forever

        # the key is never saved with the checkpoint's config: a `--set serve.api_key=...` given here is handed on
        key = config.serve.api_key
        serve_forever(checkpoint=best, index=index_dir, port=port, settings={"api_key": key} if key else None)
    else:
        print(f"serve it with: cman serve --checkpoint {best} --index {index_dir}")
    return result


def _stale(index_dir: Path, checkpoint: Path) -> bool:
    meta = json.loads((index_dir / "index_meta.json").read_text())
    return meta.get("checkpoint") != str(Path(checkpoint).resolve())

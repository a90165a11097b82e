"""Ray Train driver for CMAN: `cman train` and the `ray job submit` entry point (`python -m jobs.train`).

Every worker runs `train_loop_per_worker`, which is the library's epoch (`cman.training.fit`, with `RayHooks`) on a DDP
model over its DistributedSampler share of the training set. Validation is computed on embeddings gathered from
all workers (each embeds a contiguous, unpadded shard of the val set), so the numbers equal a single-process
evaluation. Rank 0 writes the checkpoint (the `CMAN.save_pretrained` format plus optimiser/scheduler/RNG state)
and logs the epoch to MLflow. The run is named by its output directory (`D/ray_results/cman_train`), so running
the same command again continues an interrupted run from its latest checkpoint; a finished run is not retrained,
only exported and evaluated again. `--no-resume` (`resume=False`) starts over.

MLflow (`jobs.tracking`) is imported only where a run is logged (the driver and rank 0 of a tracked run): a Tune
trial's workers and the other ranks never import it (mlflow + matplotlib: ~3 s of CPU per worker on 2 cores).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint
from torch.utils.data import DistributedSampler

from cman.config import CMANConfig, from_dict
from cman.metrics import VAL_METRIC, EmbeddingSet
from cman.modality import Modality
from cman.training import TrainHooks, finish, fit, load_items, resolve_device
from jobs import cluster, faults, storage
from jobs.launch import RUN_NAME, build_trainer, make_loop_config

if TYPE_CHECKING:
    from jobs.tracking import Tracking

logger = logging.getLogger(__name__)

FAIL_ONCE_ENV = "CMAN_FAIL_ONCE_AT_EPOCH"  # fault injection for FailureConfig tests: fail once, in this epoch


# ---- the per-worker loop -------------------------------------------------------------------------------------------
def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Train (or resume) the run described by `loop_config` (see `make_loop_config`): `cman.training.fit` with
    `RayHooks` on this worker."""
    config = from_dict(loop_config["config"])
    hooks = RayHooks(config, loop_config)
    train_items = load_items(config, config.data.train_split)
    if hooks.world > 1 and len(train_items) // hooks.world < config.training.batch_size:
        raise ValueError(
            f"{len(train_items)} training items over {hooks.world} workers leave fewer than training.batch_size="
            f"{config.training.batch_size} per worker (batch_size is per worker): lower it or ray.num_workers"
        )
    with hooks.checkpoint_dir():
        fit(config, hooks.output_dir, hooks, progress=hooks.rank == 0 and loop_config.get("progress", False))


class RayHooks(TrainHooks):
    """`cman.training.fit` on a Ray Train worker: DDP, DistributedSampler, gathered validation, `ray.train.report`."""

    final_eval = False  # the driver evaluates the exported best checkpoint

    def __init__(self, config: CMANConfig, loop_config: dict[str, Any]):
        super().__init__(loop_config["output_dir"], resume=True)
        self.loop_config = loop_config
        self.context = ray.train.get_context()
        self.rank, self.world = self.context.get_world_rank(), self.context.get_world_size()
        self.run = _worker_run(loop_config) if self.rank == 0 else None  # only rank 0 logs to MLflow
        self._resume: Path | None = None
        in_process = config.ray.num_workers == 0
        self.staging = self.output_dir / "ray_results" / RUN_NAME / "in_process" if in_process else None
        if not in_process:  # in-process mode runs in the caller's process: leave its threads alone
            set_worker_threads(config)
        if not loop_config.get("verbose"):
            cluster.quiet_train_worker_logs()
            if not loop_config.get("log_epochs", True):  # under Tune: its status table reports the epochs
                logging.getLogger("cman").setLevel(logging.WARNING)

    @contextlib.contextmanager
    def checkpoint_dir(self):
        """Make Ray's latest checkpoint (if any) available to `resume_from` while the loop runs."""
        checkpoint = ray.train.get_checkpoint()
        with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as directory:
            self._resume = Path(directory) if directory else None
            yield

    def resume_from(self) -> Path | None:
        return self._resume

    def device(self, config: CMANConfig) -> torch.device:
        return ray.train.torch.get_device() if dist.is_initialized() else resolve_device(config.training.device)

    def wrap_model(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        return ray.train.torch.prepare_model(
            model, move_to_device=device, parallel_strategy_kwargs={"find_unused_parameters": True}
        )

    def sampler(self, config: CMANConfig, items: list[Any]) -> DistributedSampler | None:
        if self.world == 1:
            return None
        seed = config.training.seed
        return DistributedSampler(
            items, num_replicas=self.world, rank=self.rank, shuffle=True, seed=seed, drop_last=True
        )

    def before_epoch(self, epoch: int) -> None:
        _maybe_fail(self.loop_config, self.output_dir, epoch, self.rank)
        if self.rank == 0:
            faults.pause_point(f"train-{self.output_dir.name}-epoch-{epoch}", self.loop_config.get("pause") or {})

    def val_items(self, items: list[Any]) -> list[Any]:
        return shard(items, self.rank, self.world)

    def gather(self, local: dict[Modality, EmbeddingSet]) -> dict[Modality, EmbeddingSet]:
        return gather(local, self.world)

    def end_epoch(self, state: Any, val: dict[str, Any], metrics: dict[str, Any], save: set[str]) -> None:
        """`ray.train.report` on every rank (a barrier); rank 0 attaches a checkpoint when one is due (`save`)."""
        started = time.perf_counter()
        if self.rank != 0 or not save:
            ray.train.report(metrics)
        elif self.staging is not None:  # in-process mode: Ray keeps a reference to our directory, so it must persist
            directory = state.save(self.staging / f"checkpoint_epoch_{state.epoch:04d}", val)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(directory)))
        else:
            with tempfile.TemporaryDirectory() as tmp:  # Ray copies it into storage_path before report returns
                directory = state.save(Path(tmp) / "checkpoint", val)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(directory)))
        seconds = time.perf_counter() - started
        if self.rank == 0:
            logger.debug("epoch %d: report%s %.2fs", state.epoch, " + checkpoint" if save else "", seconds)
        if self.run is not None and self.rank == 0:
            from jobs import tracking

            logged = {k: v for k, v in metrics.items() if k not in ("epoch", "start_epoch")}
            tracking.log_metrics(self.run, {**logged, "report_seconds": seconds}, step=state.epoch)


def _worker_run(loop_config: dict[str, Any]) -> Tracking | None:
    """The MLflow run this worker logs its epochs to (`make_loop_config`'s "mlflow"), None if the loop logs nothing."""
    if not loop_config.get("mlflow"):
        return None
    from jobs import tracking

    return tracking.Tracking(**loop_config["mlflow"])


def set_worker_threads(config: CMANConfig) -> int:
    """torch threads = `training.num_threads`, else this worker's CPU share rounded up (Ray's OMP_NUM_THREADS
    rounds it down: a worker given 1.8 CPUs would run 1 thread)."""
    cpus = float(config.ray.resources_per_worker.get("CPU", 1.0))
    threads = config.training.num_threads or max(1, math.ceil(cpus - 1e-6))
    torch.set_num_threads(threads)
    return threads


def shard(items: list[Any], rank: int, world: int) -> list[Any]:
    """Contiguous, unpadded shard of `items` for `rank`; concatenating the shards in rank order gives `items`."""
    n = len(items)
    return items[rank * n // world : (rank + 1) * n // world]


def gather(local: dict[Modality, EmbeddingSet], world: int) -> dict[Modality, EmbeddingSet]:
    """All-gather every rank's embeddings (rank order = item order) into the full val set, on every rank."""
    if world == 1 or not dist.is_initialized():
        return local
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, {m.value: (s.keys, s.groups, s.embeddings) for m, s in local.items()})
    merged: dict[str, tuple[list[str], list[str], list[np.ndarray]]] = {}
    for part in parts:
        for modality, (keys, groups, embeddings) in part.items():
            entry = merged.setdefault(modality, ([], [], []))
            entry[0].extend(keys)
            entry[1].extend(groups)
            entry[2].append(embeddings)
    return {
        Modality(m): EmbeddingSet(keys=k, groups=g, embeddings=np.concatenate(e)) for m, (k, g, e) in merged.items()
    }


def _maybe_fail(loop_config: dict[str, Any], output_dir: Path, epoch: int, rank: int) -> None:
    """Fault injection: rank 0 raises once when epoch `fail_once_at_epoch` starts (a marker file makes it once)."""
    if loop_config.get("fail_once_at_epoch") != epoch or rank != 0:
        return
    marker = output_dir / f".injected_failure_epoch_{epoch}"
    if not marker.exists():
        marker.touch()
        raise RuntimeError(f"injected failure at the start of epoch {epoch} ({FAIL_ONCE_ENV})")


# ---- the driver ----------------------------------------------------------------------------------------------------
def run_training(
    config: CMANConfig,
    output_dir: str | Path,
    address: str | None = None,
    resume: bool = True,
    *,
    track: bool = True,
    local_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train with Ray Train, export checkpoints/{best,last}, evaluate best on the test split.

    `output_dir` is a folder or a storage URI (`jobs.storage`): with a URI, Ray's run is kept there and the exported
    checkpoints, eval and MLflow store go to `local_dir`. Returns `{"history", "test", "eval_path"}` like
    `cman.training.fit`.
    """
    where = storage.locate(output_dir, local_dir)
    local = where.local_dir
    config = _absolute_paths(config, where.output)
    if not resume or config.ray.num_workers == 0:  # in-process mode never resumes
        _start_over(where)
    local.mkdir(parents=True, exist_ok=True)
    config.save(local / "config.yaml")
    from jobs import tracking

    run = tracking.open_run(config, local, resume=resume) if track else None
    fail_at = int(os.environ[FAIL_ONCE_ENV]) if os.environ.get(FAIL_ONCE_ENV) else None
    loop_config = make_loop_config(config, local, run, fail_once_at_epoch=fail_at)
    finished = finished_result(where, config.training.epochs) if resume and config.ray.num_workers > 0 else None
    started = finished is None and config.ray.num_workers > 0 and cluster.connect(address)
    try:
        if finished is None:
            ray_storage = where.ray_storage("ray_results")
            trainer = build_trainer(config, local, loop_config, train_loop_per_worker, ray_storage=ray_storage)
            finished = trainer.fit()
        else:
            logger.info("the run in %s already trained all %d epochs", where.describe(), config.training.epochs)
        best, last = export_checkpoints(finished, local)
        report = finish(config, local, _history(last))
        if run is not None:
            tracking.finish_run(run, report, best)
    except BaseException:
        if run is not None:
            tracking.fail_run(run)
        raise
    finally:
        if started:
            ray.shutdown()
    return report


def finished_result(where: storage.RunLocation, epochs: int) -> Any | None:
    """The stored Ray Train run's `Result` if its latest checkpoint is of epoch `epochs` or later, else None.

    Re-running a finished `cman train` then exports and evaluates it again without starting Ray Train (a fit that
    has nothing left to train still costs ~20 s of controller and worker start-up here)."""
    from ray.train import Result

    try:
        result = Result.from_path(where.join("ray_results", RUN_NAME), storage_filesystem=where.fs)
    except RuntimeError:  # no run there yet, or one that never recorded a checkpoint
        return None
    return result if int((result.metrics or {}).get("epoch", 0)) >= epochs else None


def _start_over(where: storage.RunLocation) -> None:
    """Remove the previous Ray run (in Ray's storage) and the in-process mode's checkpoints (always local)."""
    if where.exists("ray_results", RUN_NAME):
        logger.info("starting over: removing the previous run %s", where.describe("ray_results", RUN_NAME))
        storage.delete_dir(where.fs, where.join("ray_results", RUN_NAME))
    shutil.rmtree(where.local_dir / "ray_results" / RUN_NAME / "in_process", ignore_errors=True)


def export_checkpoints(result: Any, output_dir: Path) -> tuple[Path, Path]:
    """Copy the best (max val_rsum, earliest on ties) and the latest checkpoint to D/checkpoints/{best,last}
    (`as_directory` downloads them first when Ray's storage is a URI)."""
    if result.checkpoint is None:
        raise RuntimeError(f"training in {output_dir} reported no checkpoint (see the Ray logs above)")
    candidates = list(result.best_checkpoints or [(result.checkpoint, result.metrics or {})])
    if result.best_checkpoints is None:  # in-process mode: every epoch's checkpoint is in the staging dir
        staging = output_dir / "ray_results" / RUN_NAME / "in_process"
        candidates = [(Checkpoint.from_directory(str(p)), _metadata_metrics(p)) for p in sorted(staging.iterdir())]
    best_ckpt, _ = max(candidates, key=lambda cm: (cm[1].get(VAL_METRIC, -np.inf), -cm[1].get("epoch", 0)))
    targets = {"best": best_ckpt, "last": result.checkpoint}
    paths = {}
    for name, ckpt in targets.items():
        with ckpt.as_directory() as source:
            paths[name] = _copy_dir(Path(source), output_dir / "checkpoints" / name)
    return paths["best"], paths["last"]


def _metadata_metrics(directory: Path) -> dict[str, Any]:
    meta = json.loads((directory / "metadata.json").read_text())
    return {VAL_METRIC: meta["metrics"]["rsum"], "epoch": meta["epoch"]}


def _copy_dir(source: Path, target: Path) -> Path:
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _history(checkpoint_dir: Path) -> list[dict[str, Any]]:
    return json.loads((checkpoint_dir / "training_state.json").read_text())["history"]


def _absolute_paths(config: CMANConfig, output_dir: str) -> CMANConfig:
    """Workers run in their own directories: make data.root and output_dir absolute (relative to this process)."""
    overrides: dict[str, Any] = {"output_dir": str(output_dir)}
    if config.data.root:
        overrides["data.root"] = str(Path(config.data.root).resolve())
    return config.with_overrides(overrides)


if __name__ == "__main__":  # `python -m jobs.train ...` (the `ray job submit` entry) is `cman train ...`
    from cman import cli  # here, not at import: jobs.train is imported by cman.cli, never the reverse

    sys.exit(cli.main(["train", *sys.argv[1:]]))

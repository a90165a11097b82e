"""Building a Ray Train run, kept free of the training code's imports (torch models, transformers, MLflow).

Ray Train's controller and a Tune trial's driver process import the module of whatever they unpickle or call: with
`build_trainer` here, a sweep trial's driver imports this module and Ray, not `jobs.train` and everything behind
it (measured on the 2-core VM: `import jobs.train` ≈ 10 s of CPU, `import ray.train.torch` ≈ 4 s). The loop
function (`loop`) is the caller's: `jobs.train.train_loop_per_worker`, or the sweep's wrapper of it.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cman.config import CMANConfig
from cman.metrics import VAL_METRIC
from jobs import cluster, faults

if TYPE_CHECKING:
    from jobs.tracking import Tracking

RUN_NAME = "cman_train"  # Ray's run folder: D/ray_results/cman_train


def make_loop_config(
    config: CMANConfig, output_dir: Path, run: Tracking | None = None, fail_once_at_epoch: int | None = None
) -> dict[str, Any]:
    """What `train_loop_per_worker` needs; `run=None` turns per-epoch MLflow logging off (e.g. under Tune)."""
    return {
        "config": config.to_dict(),
        "output_dir": str(Path(output_dir).resolve()),
        "mlflow": asdict(run) if run is not None else False,
        "fail_once_at_epoch": fail_once_at_epoch,
        "pause": faults.settings(),  # pause points for fault tests (jobs.faults); {} unless set
        "verbose": cluster.is_verbose(),
    }


def build_trainer(
    config: CMANConfig,
    output_dir: Path,
    loop_config: dict[str, Any],
    loop: Any,
    callbacks: list[Any] | None = None,
    ray_storage: dict[str, Any] | None = None,
) -> TorchTrainer:
    """A TorchTrainer over `config.ray`, stored under `output_dir/ray_results/cman_train` (best + latest kept), or
    where `ray_storage` (`RunConfig` storage_path / storage_filesystem, see `jobs.storage`) says."""
    rc = config.ray
    run_config = RunConfig(
        name=RUN_NAME,
        **(ray_storage or {"storage_path": str(Path(output_dir).resolve() / "ray_results")}),
        checkpoint_config=CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute=VAL_METRIC, checkpoint_score_order="max"
        ),  # the latest is always kept as well
        failure_config=FailureConfig(max_failures=rc.max_failures),
        callbacks=callbacks,
        # Ray Train's own INFO lines per run and per report (resources, worker group, process group, reports)
        logging_config=LoggingConfig(log_level="INFO" if loop_config.get("verbose") else "WARNING"),
    )
    scaling = ScalingConfig(
        num_workers=rc.num_workers, use_gpu=rc.use_gpu, resources_per_worker=dict(rc.resources_per_worker)
    )
    return TorchTrainer(loop, train_loop_config=loop_config, scaling_config=scaling, run_config=run_config)

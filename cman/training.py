"""The training run, written once: data → model → epochs (train, validate, checkpoint) → test evaluation.

`fit(config, output_dir, hooks)` is the whole loop. `cman train --in-process` calls it with the default
`TrainHooks` (this process, best/last checkpoints under `output_dir`); the Ray Train worker loop
(`jobs/train.py`) calls the same function with hooks that wrap the model in DDP, give each rank a
`DistributedSampler` share, gather validation embeddings and `ray.train.report` at the end of an epoch.
The framework-neutral steps (optimiser, one epoch, evaluation, resumable state) live in `cman/steps.py`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from cman.config import CMANConfig
from cman.data.augment import build_augment
from cman.data.cache import FeatureCache, fit_audio_length
from cman.data.dataset import CMANDataset, Collator, Item, load_split
from cman.data.sampler import neighbour_sampler, speaker_sampler
from cman.losses import CMANLoss
from cman.metrics import VAL_METRIC, EmbeddingSet, evaluate_embeddings, format_table
from cman.modality import Modality
from cman.models.cman import CMAN, build_model
from cman.precision import dtype_name
from cman.steps import (
    amp_dtype,
    build_optimizer,
    build_scheduler,
    compute_embeddings,
    evaluate,
    flat_metrics,
    load_training_state,
    resolve_device,
    save_training_state,
    train_epoch,
)

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def data_root(config: CMANConfig) -> Path:
    if not config.data.root:
        raise ValueError("data.root is not set: point it at a dataset in the seed layout (see `cman demo-data`)")
    return Path(config.data.root)


def load_items(config: CMANConfig, split: str) -> list[Item]:
    return load_split(data_root(config), split, config.data.max_items)


def make_loader(
    config: CMANConfig,
    model: CMAN,
    items: list[Item],
    *,
    train: bool,
    sampler: Sampler | None = None,
    batch_size: int | None = None,
) -> DataLoader:
    """The loader of `items`; `sampler` (keyword, like any future option) replaces the seeded shuffle."""
    store = FeatureCache(config.data.cache_dir, items, model.processors) if config.data.cache_dir else None
    augment = build_augment(config, list(model.processors)) if train else None
    dataset = CMANDataset(
        items,
        model.processors,
        config.data.skip_bad_items,
        cache=config.data.cache_features,
        store=store,
        augment=augment,
    )
    generator = torch.Generator().manual_seed(config.training.seed)
    size = batch_size or (config.training.batch_size if train else config.training.eval_batch_size)
    if train and sampler is None and config.data.neighbour_batches:
        sampler = neighbour_sampler(items, size, generator)  # None unless some groups differ in one attribute
    if train and sampler is None and config.data.balance_speakers:
        sampler = speaker_sampler(items, generator)  # None unless the items name several speakers
    return DataLoader(
        dataset,
        batch_size=size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train and len(dataset) > size,
        collate_fn=Collator(model.processors),
        num_workers=config.data.num_workers,
        generator=generator,
    )


@dataclass
class TrainState:
    """Everything that moves between epochs, and what a resume restores."""

    model: CMAN
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: CMANLoss
    epoch: int = 0
    best_rsum: float = -math.inf
    history: list[dict[str, Any]] = field(default_factory=list)
    precision: str = "fp32"  # what the model computed in (cman.precision.dtype_name), written into metadata.json

    def save(self, directory: Path, metrics: dict[str, Any] | None = None) -> Path:
        extra = {"epoch": self.epoch, "best_rsum": self.best_rsum, "history": self.history}
        return self.model.save_pretrained(
            directory,
            metadata={"epoch": self.epoch, "metrics": metrics or {}, "precision": self.precision},
            extra_files=lambda tmp: save_training_state(tmp, self.optimizer, self.scheduler, extra),
        )


def create_state(
    config: CMANConfig, train_items: list[Item], steps_per_epoch: int, resume_from: Path | None = None
) -> TrainState:
    """A fresh model/optimiser/scheduler, or those of `resume_from` (a checkpoint with training state)."""
    if resume_from is not None:
        model = CMAN.from_pretrained(resume_from, trainable=True)
    else:
        config = fit_audio_length(config, train_items)
        model = build_model(config, captions=[i.caption for i in train_items if i.caption])
    model.set_gradient_checkpointing(config.training.gradient_checkpointing)
    tc = config.training
    optimizer = build_optimizer(model, tc, fused=tc.fused_adamw)
    total_steps = tc.epochs * math.ceil(steps_per_epoch / tc.grad_accum)
    scheduler = build_scheduler(optimizer, total_steps, tc.warmup_ratio)
    state = TrainState(model, optimizer, scheduler, CMANLoss.from_config(config.loss))
    if resume_from is not None:
        extra = load_training_state(resume_from, optimizer, scheduler)
        state.epoch, state.best_rsum, state.history = extra["epoch"], extra["best_rsum"], extra["history"]
        logger.info("resumed from %s at epoch %d", resume_from, state.epoch)
    return state


def compile_model(model: CMAN, enabled: bool) -> CMAN:
    """torch.compile each encoder and the fusion in place (parameter names and checkpoints are unchanged)."""
    if enabled:
        for module in [*model.encoders.values(), model.fusion]:
            module.compile(dynamic=True)
    return model


class TrainHooks:
    """What differs between this process and a Ray Train worker; the defaults are the in-process run.

    `jobs/train.py` subclasses it: DDP model, DistributedSampler, gathered validation, `ray.train.report`.
    """

    rank, world = 0, 1
    final_eval = True  # evaluate checkpoints/best on the test split when the epochs are done

    def __init__(self, output_dir: str | Path, resume: bool = True):
        self.output_dir = Path(output_dir).resolve()
        self.resume = resume

    def resume_from(self) -> Path | None:
        """The checkpoint to continue from (the newest of checkpoints/{best,last} with training state)."""
        return resumable_checkpoint(self.output_dir) if self.resume else None

    def device(self, config: CMANConfig) -> torch.device:
        return resolve_device(config.training.device)

    def wrap_model(self, model: CMAN, device: torch.device) -> torch.nn.Module:
        return model.to(device)

    def sampler(self, config: CMANConfig, items: list[Item]) -> Sampler | None:
        return None

    def before_epoch(self, epoch: int) -> None:
        """Called with the 1-based number of the epoch about to run."""

    def val_items(self, items: list[Item]) -> list[Item]:
        return items

    def gather(self, local: dict[Modality, EmbeddingSet]) -> dict[Modality, EmbeddingSet]:
        return local

    def end_epoch(self, state: TrainState, val: dict[str, Any], metrics: dict[str, Any], save: set[str]) -> None:
        """Persist the epoch: `save` names the checkpoints due now ("best" when improved, "last" when due)."""
        for name in sorted(save):
            state.save(self.output_dir / "checkpoints" / name, val)


def fit(
    config: CMANConfig,
    output_dir: str | Path,
    hooks: TrainHooks | None = None,
    *,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train; returns `{"history", "test", "eval_path"}` (test/eval_path None when `hooks.final_eval` is off).

    `hooks` default: `TrainHooks(output_dir, resume)` (this process). `stop_after` ends this call after that many
    epochs (the run stays resumable: call again to continue).
    """
    hooks = hooks or TrainHooks(output_dir, resume=resume)
    tc = config.training
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    seed_everything(tc.seed)
    train_items, val_items = load_items(config, config.data.train_split), load_items(config, config.data.val_split)
    steps = max(1, len(train_items) // (tc.batch_size * hooks.world))
    state = create_state(config, train_items, steps, hooks.resume_from())
    device = hooks.device(config)
    model = hooks.wrap_model(state.model, device)
    compile_model(state.model, tc.compile)  # in place: a DDP wrapper runs the compiled modules
    dtype = amp_dtype(device, tc.mixed_precision)
    state.precision = dtype_name(dtype)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    sampler = hooks.sampler(config, train_items)
    train_loader = make_loader(config, state.model, train_items, train=True, sampler=sampler)
    val_loader = make_loader(config, state.model, hooks.val_items(val_items), train=False)
    if hooks.rank == 0:
        hooks.output_dir.mkdir(parents=True, exist_ok=True)
        config.save(hooks.output_dir / "config.yaml")
    start_epoch, epochs_run = state.epoch, 0
    while state.epoch < tc.epochs:
        if stop_after is not None and epochs_run >= stop_after:
            return {"history": state.history, "test": None, "eval_path": None, "stopped": True}
        epochs_run += 1
        started_at = time.time()
        hooks.before_epoch(state.epoch + 1)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(state.epoch)
        state.loss_fn.set_epoch(state.epoch + 1)
        stats = train_one_epoch(config, state, train_loader, device, dtype, scaler, model=model, progress=progress)
        started = time.perf_counter()
        val = evaluate_embeddings(hooks.gather(compute_embeddings(state.model, val_loader, device, dtype)))
        stats["val_seconds"], stats["started_at"] = time.perf_counter() - started, started_at
        record, improved = end_epoch(config, state, stats, val)
        metrics = {**flat_metrics(val), **record, "start_epoch": start_epoch, "world_size": hooks.world}
        metrics["lr"] = state.optimizer.param_groups[0]["lr"]
        hooks.end_epoch(state, val, metrics, checkpoints_due(config, state.epoch, improved, epochs_run, stop_after))
    if not hooks.final_eval:
        return {"history": state.history, "test": None, "eval_path": None}
    return finish(config, hooks.output_dir, state.history, progress)


def checkpoints_due(
    config: CMANConfig, epoch: int, improved: bool, epochs_run: int = 0, stop_after: int | None = None
) -> set[str]:
    """Which checkpoints the epoch just ended writes: best when it improved; last every
    `training.checkpoint_every` epochs, at the final epoch and where `stop_after` ends this call."""
    every, due = config.training.checkpoint_every, set()
    if improved:
        due.add("best")
    if epoch == config.training.epochs or (every and epoch % every == 0) or epochs_run == stop_after:
        due.add("last")
    return due


def train_one_epoch(
    config: CMANConfig,
    state: TrainState,
    loader: DataLoader,
    device: torch.device,
    dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
    *,
    model: torch.nn.Module | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Train `state` for one epoch (seeded by epoch number, so a resumed run repeats it exactly).

    `model` is what runs forward/backward: `state.model` itself, or a DDP wrapper of it.
    """
    tc = config.training
    torch.manual_seed(tc.seed + state.epoch)
    if getattr(loader, "generator", None) is not None:  # the shuffle order depends only on the epoch too
        loader.generator.manual_seed(tc.seed + state.epoch)
    return train_epoch(
        model or state.model,
        loader,
        state.loss_fn,
        state.optimizer,
        state.scheduler,
        device=device,
        dtype=dtype,
        scaler=scaler,
        grad_accum=tc.grad_accum,
        grad_clip=tc.grad_clip,
        progress=progress,
        desc=f"epoch {state.epoch + 1}/{tc.epochs}",
    )


def end_epoch(
    config: CMANConfig, state: TrainState, stats: dict[str, float], val: dict[str, Any]
) -> tuple[dict[str, Any], bool]:
    """Advance the epoch, append its history record; True if `val` improved on the best rsum so far."""
    state.epoch += 1
    record = {"epoch": state.epoch, "train_loss": stats["loss"], VAL_METRIC: val["rsum"], "seconds": stats["seconds"]}
    record.update({k: stats[k] for k in ("val_seconds", "started_at") if k in stats})
    state.history.append(record)
    logger.info(
        "epoch %d/%d  loss %.4f  val rsum %.1f  (%.1fs)",
        state.epoch,
        config.training.epochs,
        stats["loss"],
        val["rsum"],
        stats["seconds"],
    )
    improved = val["rsum"] > state.best_rsum
    if improved:
        state.best_rsum = val["rsum"]
    return record, improved


def resumable_checkpoint(output_dir: Path) -> Path | None:
    """The newest (by epoch) of D/checkpoints/{best,last} that carries training state; None if neither does."""
    found = []
    for name in ("last", "best"):
        directory = Path(output_dir) / "checkpoints" / name
        if (directory / "training_state.json").is_file():
            found.append((json.loads((directory / "training_state.json").read_text())["epoch"], directory))
    return max(found, key=lambda f: f[0])[1] if found else None


def write_eval(output_dir: Path, split: str, result: dict[str, Any]) -> Path:
    path = Path(output_dir) / f"eval_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"split": split, **result}, indent=2))
    return path


def finish(
    config: CMANConfig, output_dir: Path, history: list[dict[str, Any]], progress: bool = False
) -> dict[str, Any]:
    """Evaluate checkpoints/best on the test split, write eval_<split>.json, return the report."""
    split = config.data.test_split
    result = evaluate_checkpoint(output_dir / "checkpoints" / "best", split, config.data.root, progress=progress)
    path = write_eval(output_dir, split, result)
    logger.info("test metrics written to %s", path)
    return {"history": history, "test": result, "eval_path": str(path)}


def evaluate_checkpoint(
    checkpoint: str | Path, split: str, root: str | None = None, progress: bool = False
) -> dict[str, Any]:
    """Load `checkpoint` and compute six-direction metrics on `split` of its (or `root`'s) dataset."""
    model = CMAN.from_pretrained(checkpoint)
    config = model.config
    if root is not None:
        config = config.with_overrides({"data.root": str(root)})
    device = resolve_device(config.training.device)
    model.to(device)
    loader = make_loader(config, model, load_items(config, split), train=False)
    return evaluate(model, loader, device, amp_dtype(device, config.training.mixed_precision), progress)


__all__ = [
    "TrainHooks",
    "TrainState",
    "create_state",
    "end_epoch",
    "evaluate_checkpoint",
    "finish",
    "fit",
    "format_table",
    "make_loader",
    "train_one_epoch",
]

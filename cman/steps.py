"""Framework-neutral training steps: optimiser, schedule, one epoch, embeddings, evaluation, resumable state.

`cman.training.fit` (in-process and under Ray Train alike) is built from these; nothing re-implements them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from cman.config import TrainingConfig
from cman.metrics import EmbeddingSet, evaluate_embeddings
from cman.modality import Modality
from cman.precision import resolve_dtype

logger = logging.getLogger(__name__)


def resolve_device(device: str | bool | None = "auto") -> torch.device:
    """`training.device` ("auto", "cpu", "cuda"; True/False/None also accepted) → the torch device to use."""
    if device in ("cpu", False) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def amp_dtype(device: torch.device, mixed_precision: str, purpose: str = "training") -> torch.dtype | None:
    """The autocast dtype for `mixed_precision` on `device` (None: fp32); `auto` follows `cman.precision`."""
    return resolve_dtype(device, mixed_precision, purpose=purpose)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def build_optimizer(model: nn.Module, cfg: TrainingConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW; encoder parameters may get their own lr; no weight decay on biases and norms."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_encoder = name.startswith("encoders.") and ".backbone." in name
        no_decay = param.ndim < 2 or "norm" in name.lower() or name.endswith(".cls")
        groups.setdefault((is_encoder, no_decay), []).append(param)
    enc_lr = cfg.encoder_learning_rate or cfg.learning_rate
    param_groups = [
        {
            "params": params,
            "lr": enc_lr if is_enc else cfg.learning_rate,
            "weight_decay": 0.0 if nd else cfg.weight_decay,
        }
        for (is_enc, nd), params in sorted(groups.items())
    ]
    kwargs = {"fused": True} if fused and torch.cuda.is_available() else {}
    return torch.optim.AdamW(param_groups, **kwargs)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to 0 over `total_steps` optimiser steps."""
    warmup = max(1, int(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = dict(batch)
    out["inputs"] = {m: {k: v.to(device, non_blocking=True) for k, v in f.items()} for m, f in batch["inputs"].items()}
    out["present"] = dict(batch["present"])  # stays on the host: row selection needs no device sync
    out["groups"] = batch["groups"].to(device)
    return out


def batch_embeddings(model: nn.Module, batch: dict[str, Any]) -> dict[Modality, torch.Tensor]:
    """Per-modality embeddings scattered back to full batch rows (absent rows are zero). # (batch, dim)"""
    per_modality = model(batch["inputs"])
    size = batch["groups"].shape[0]
    full = {}
    for modality, emb in per_modality.items():
        present = batch["present"][modality].cpu()  # (batch,) bool; already on the host in a loader batch
        if emb.shape[0] == size:  # every row has this modality
            full[modality] = emb
            continue
        index = present.nonzero().squeeze(1).to(emb.device, non_blocking=True)  # (batch_m,)
        full[modality] = emb.new_zeros(size, emb.shape[-1]).index_copy(0, index, emb)
    return full


def train_step_loss(
    model: nn.Module, loss_fn: nn.Module, batch: dict[str, Any], device: torch.device | None = None, dtype=None
) -> dict[str, torch.Tensor]:
    """The loss of one batch: the model under autocast to `dtype` (None: fp32), the loss always in fp32.

    The similarity matrix and the hinges are computed from fp32 embeddings outside autocast (bf16 keeps 8 bits of
    mantissa: cosines of near neighbours differ by less; `bench/precision_check.py` measures the difference).
    """
    with autocast(device or torch.device("cpu"), dtype):
        embeddings = batch_embeddings(model, batch)
    embeddings = {m: e.float() for m, e in embeddings.items()}
    return loss_fn(embeddings, batch["present"], batch["groups"])


def train_epoch(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    grad_accum: int = 1,
    grad_clip: float = 1.0,
    progress: bool = True,
    desc: str = "train",
    max_steps: int | None = None,
) -> dict[str, float]:
    """One pass over `loader`; returns mean loss, steps, samples, skipped items and seconds."""
    model.train()
    start = time.perf_counter()
    total = torch.zeros((), device=device)
    batches = samples = skipped = steps = 0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False)
    optimizer.zero_grad(set_to_none=True)
    for batch in bar:
        skipped += batch["skipped"]
        if batch["groups"].numel() < 2:
            continue
        batch = to_device(batch, device)
        loss = train_step_loss(model, loss_fn, batch, device, dtype)["loss"] / grad_accum
        (scaler.scale(loss) if scaler else loss).backward()
        total += loss.detach() * grad_accum
        batches += 1
        samples += batch["groups"].numel()
        if batches % grad_accum == 0:
            _optimizer_step(model, optimizer, scheduler, scaler, grad_clip)
            steps += 1
            if progress and steps % 10 == 0:
                bar.set_postfix(loss=f"{(total / batches).item():.4f}")
        if max_steps is not None and batches >= max_steps:
            break
    if batches % grad_accum:
        _optimizer_step(model, optimizer, scheduler, scaler, grad_clip)
        steps += 1
    if skipped:
        logger.warning("%d bad items skipped this epoch", skipped)
    return {
        "loss": float((total / max(batches, 1)).item()),
        "steps": steps,
        "samples": samples,
        "skipped": skipped,
        "seconds": time.perf_counter() - start,
    }


def _optimizer_step(model, optimizer, scheduler, scaler, grad_clip: float) -> None:
    if scaler:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def compute_embeddings(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[Modality, EmbeddingSet]:
    """Embed every item of `loader`, each modality on its own (gallery/query embeddings)."""
    model.eval()
    keys: dict[Modality, list[str]] = {}
    groups: dict[Modality, list[str]] = {}
    vectors: dict[Modality, list[np.ndarray]] = {}
    for batch in tqdm(loader, desc="embed", disable=not progress, leave=False):
        if not batch["ids"]:
            continue
        batch = to_device(batch, device)
        with autocast(device, dtype):
            per_modality = model(batch["inputs"])
        for modality, emb in per_modality.items():
            present = batch["present"][modality].cpu().numpy()
            keys.setdefault(modality, []).extend(batch["keys"][modality])
            groups.setdefault(modality, []).extend(g for g, p in zip(batch["group_names"], present, strict=True) if p)
            vectors.setdefault(modality, []).append(emb.float().cpu().numpy())
    return {
        m: EmbeddingSet(keys=keys[m], groups=groups[m], embeddings=np.concatenate(vectors[m]).astype(np.float32))
        for m in vectors
    }


def evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Six-direction retrieval metrics of `model` on `loader`."""
    return evaluate_embeddings(compute_embeddings(model, loader, device, dtype, progress))


def flat_metrics(result: dict[str, Any], prefix: str = "val_") -> dict[str, float]:
    """`{"val_rsum": .., "val_text->image_R@1": ..}`, the shape trackers want."""
    out = {f"{prefix}rsum": float(result["rsum"])}
    for direction, values in result["directions"].items():
        for name, value in values.items():
            out[f"{prefix}{direction}_{name}"] = float(value)
    return out


# ---- resumable optimiser / scheduler / RNG state (safetensors + JSON, no pickle) -----------------------------------
def save_training_state(
    directory: str | Path, optimizer: torch.optim.Optimizer, scheduler: Any, extra: dict[str, Any]
) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    np_state = np.random.get_state()
    meta = {
        "param_groups": state["param_groups"],
        "scalars": scalars,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": {"python": repr(random.getstate()), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]},
        **extra,
    }
    save_file(tensors, str(directory / "training_state.safetensors"))
    (directory / "training_state.json").write_text(json.dumps(meta, default=str))


def load_training_state(directory: str | Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore what `save_training_state` wrote; returns its `extra` fields (epoch, best metric, ...)."""
    directory = Path(directory)
    tensors = load_file(str(directory / "training_state.safetensors"))
    meta = json.loads((directory / "training_state.json").read_text())
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta.pop("scalars").items():
        opt_state.setdefault(int(idx), {}).update(entry)
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta.pop("param_groups")})
    sched = meta.pop("scheduler")
    if scheduler is not None and sched is not None:
        scheduler.load_state_dict(sched)
    torch.set_rng_state(tensors["rng.torch"])
    rng = meta.pop("rng")
    random.setstate(_literal(rng["python"]))
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    return meta


def _literal(text: str) -> Any:
    import ast

    return ast.literal_eval(text)

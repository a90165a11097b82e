#!/usr/bin/env python
"""Training throughput and MFU of the real CMAN train step, and what bounds it (data loading or compute).

    python bench/train_throughput.py --config configs/demo.yaml --preset small --dtype bf16 --steps 10

Measures, in one run and one dtype (`--dtype both`: fp32 and bf16 side by side, same process):
- the train step of `cman.training.train_epoch` (forward + CMANLoss + backward + clip + AdamW + schedule) on one
  batch from disk, after warm-up: samples/s;
- model FLOPs per step, forward + backward, counted by `torch.utils.flop_counter.FlopCounterMode`;
- the device's dense-GEMM rate (n x n matmul loop in the same dtype); MFU = achieved FLOP/s / GEMM FLOP/s;
- the data pipeline alone (decode + preprocess + collate from disk), without and with the memory-mapped
  preprocessing cache (`cman.data.cache`).
Batches come from `data.root` when it exists (unless --synthetic), else from a synthetic dataset written to a
temporary directory in the seed layout (noise WAVs, random PNGs, word captions). Prints JSON and writes it to
bench/results/train_throughput_<preset>.json (or --out).

Presets replace the config's `model` section: demo (configs/demo.yaml sizes), small (4-layer 256-wide encoders,
fusion 2x256: GEMM-dominated), base (RoBERTa-base / AST-base / ViT-base shapes, random init from `init` configs,
frozen bases + LoRA as configs/default.yaml; for GPUs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from cman.config import CMANConfig, load_config  # noqa: E402
from cman.data.dataset import load_split  # noqa: E402
from cman.losses import CMANLoss  # noqa: E402
from cman.models.cman import CMAN, build_model, count_parameters  # noqa: E402
from cman.precision import cpu_has_bf16_units  # noqa: E402
from cman.steps import (  # noqa: E402
    amp_dtype,
    build_optimizer,
    build_scheduler,
    to_device,
    train_epoch,
    train_step_loss,
)
from cman.training import compile_model, make_loader  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench.train_throughput")

_SMALL_ENC = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024}
_BASE_ENC = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
PRESETS: dict[str, dict[str, Any]] = {
    "small": {
        "text": {
            "init": {"model_type": "roberta", "max_position_embeddings": 66, **_SMALL_ENC},
            "max_length": 64,
            "freeze_base": False,
        },
        "audio": {
            "init": {
                "model_type": "audio-spectrogram-transformer",
                "num_mel_bins": 128,
                "max_length": 512,
                "patch_size": 16,
                "frequency_stride": 16,
                "time_stride": 16,
                **_SMALL_ENC,
            },
            "max_seconds": 5.12,
            "freeze_base": False,
        },
        "image": {
            "init": {"model_type": "vit", "image_size": 224, "patch_size": 16, **_SMALL_ENC},
            "freeze_base": False,
        },
        "fusion": {"layers": 2, "heads": 4, "width": 256, "ffn": 1024, "dropout": 0.1},
        "embedding_dim": 512,
        "dropout": 0.1,
        "max_tokens": 256,
    },
    "base": {  # real model shapes (roberta-base, AST-base audioset, ViT-base/16), frozen bases + LoRA
        "text": {"init": {"model_type": "roberta", "max_position_embeddings": 514, **_BASE_ENC}, "max_length": 64},
        "audio": {
            "init": {
                "model_type": "audio-spectrogram-transformer",
                "num_mel_bins": 128,
                "max_length": 1024,
                "patch_size": 16,
                "frequency_stride": 10,
                "time_stride": 10,
                **_BASE_ENC,
            },
            "max_seconds": 10.0,
        },
        "image": {"init": {"model_type": "vit", "image_size": 224, "patch_size": 16, **_BASE_ENC}},
        "fusion": {"layers": 6, "heads": 8, "width": 512, "ffn": 2048, "dropout": 0.1},
        "embedding_dim": 512,
        "dropout": 0.3,
        "max_tokens": 256,
    },
}
WORDS = "a the small large red blue green dog cat man woman runs sits on in near street field water ball".split()


def preset_config(config: CMANConfig, preset: str | None) -> CMANConfig:
    if preset is None:
        return config
    if preset == "demo":
        model = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["model"]
    else:
        model = PRESETS[preset]
    data = config.to_dict()
    data["model"] = model
    return CMANConfig.model_validate(data)


def write_synthetic_dataset(root: Path, n: int, seconds: float, seed: int = 0) -> Path:
    """`n` train items in the seed layout: noise-burst WAVs (16 kHz), random 256x256 PNGs, 6-14 word captions."""
    rng = np.random.default_rng(seed)
    for sub in ("audio/train", "images/train", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        length = int(16000 * seconds * rng.uniform(0.5, 1.0))
        wave = (rng.standard_normal(length) * np.hanning(length) * 0.3).astype(np.float32)
        sf.write(root / "audio" / "train" / f"{i}.wav", wave, 16000)
        pixels = rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / "train" / f"{i}.png")
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(6, 15))))
        entries.append({"id": str(i), "caption": caption, "audio_filename": f"{i}.wav", "image_filename": f"{i}.png"})
    (root / "metadata" / "train_metadata.json").write_text(json.dumps(entries))
    return root


def gemm_rate(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> tuple[float, float]:
    """Dense n x n x n matmul FLOP/s over about `seconds` after warm-up: per wall second, per CPU second."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    _sync(device)
    iters, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        for _ in range(4):
            torch.mm(a, b)
        iters += 4
        _sync(device)
    flops = 2.0 * n**3 * iters
    return flops / (time.perf_counter() - start), flops / max(time.process_time() - cpu_start, 1e-9)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rates(config: CMANConfig, model: CMAN, items: list, cache_dir: Path) -> dict[str, Any]:
    """Samples/s (and per CPU second) from disk through decode + preprocessing + collate, without/with the cache."""
    plain = config.with_overrides({"data.cache_features": False, "data.cache_dir": None})
    cached = config.with_overrides({"data.cache_features": False, "data.cache_dir": str(cache_dir)})

    def one_pass(cfg: CMANConfig) -> tuple[float, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        count = sum(len(batch["ids"]) for batch in make_loader(cfg, model, items, train=False))
        return count / (time.perf_counter() - start), count / max(time.process_time() - cpu_start, 1e-9)

    uncached, uncached_cpu = one_pass(plain)
    start = time.perf_counter()
    make_loader(cached, model, items, train=False)  # builds the cache
    build_s = time.perf_counter() - start
    cached_rate, cached_cpu = one_pass(cached)
    return {
        "items": len(items),
        "num_workers": config.data.num_workers,
        "uncached_samples_per_s": uncached,
        "uncached_samples_per_cpu_s": uncached_cpu,
        "cache_build_s": build_s,
        "cached_samples_per_s": cached_rate,
        "cached_samples_per_cpu_s": cached_cpu,
    }


def attention_implementations(model: CMAN) -> dict[str, str]:
    out = {}
    for name, enc in model.encoders.items():
        out[name] = str(getattr(enc.base_config, "_attn_implementation", None))
    return out


def count_step_flops(model: CMAN, loss_fn: CMANLoss, batch: dict, device: torch.device, dtype) -> int:
    """FLOPs of one forward + loss + backward (optimizer arithmetic is elementwise and not counted)."""
    with FlopCounterMode(display=False) as counter:
        loss = train_step_loss(model, loss_fn, batch, device, dtype)["loss"]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = preset_config(load_config(args.config), args.preset)
    overrides: dict[str, Any] = {"training.seed": 0}
    if args.batch_size:
        overrides["training.batch_size"] = args.batch_size
    config = config.with_overrides(overrides)
    tc = config.training
    device = torch.device(args.device)
    dtype = amp_dtype(device, "bf16" if args.dtype == "bf16" else "no")
    work = Path(tempfile.mkdtemp(prefix="cman-bench-"))
    root = Path(config.data.root) if config.data.root else None
    if args.synthetic or root is None or not (root / "metadata" / f"{config.data.train_split}_metadata.json").is_file():
        seconds = min(config.model.audio.max_seconds, 10.0) if config.model.audio else 1.0
        root = write_synthetic_dataset(work / "data", max(args.loader_items, tc.batch_size), seconds)
        source = "synthetic"
        config = config.with_overrides({"data.root": str(root), "data.train_split": "train"})
    else:
        source = str(root)
    items = load_split(root, config.data.train_split)
    model = build_model(config, captions=[i.caption for i in items if i.caption]).to(device)
    loader_items = items[: args.loader_items]
    loader = loader_rates(config, model, loader_items, work / "cache") if not args.no_loader else None

    batch = next(iter(make_loader(config, model, items[: tc.batch_size], train=True, batch_size=tc.batch_size)))
    batch = to_device(batch, device)
    loss_fn = CMANLoss.from_config(config.loss)
    flops = count_step_flops(model, loss_fn, batch, device, dtype)  # eager: FLOPs do not depend on compiling
    compile_model(model, args.compile)  # compile time falls in the warm-up steps
    optimizer = build_optimizer(model, tc, fused=args.fused_adamw)
    scheduler = build_scheduler(optimizer, args.warmup + args.steps, tc.warmup_ratio)
    step_kwargs = {"device": device, "dtype": dtype, "grad_clip": tc.grad_clip, "progress": False}
    train_epoch(model, [batch] * args.warmup, loss_fn, optimizer, scheduler, **step_kwargs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    cpu_start = time.process_time()
    stats = train_epoch(model, [batch] * args.steps, loss_fn, optimizer, scheduler, **step_kwargs)
    _sync(device)
    step_cpu_s = (time.process_time() - cpu_start) / args.steps  # CPU seconds: honest under CPU contention
    gemm_dtype = dtype or torch.float32
    gemm_n = args.gemm_size or (8192 if device.type == "cuda" else 2048)
    gemm, gemm_cpu = gemm_rate(device, gemm_dtype, gemm_n, args.gemm_seconds)
    batch_size = int(batch["groups"].numel())
    step_s = stats["seconds"] / args.steps
    samples_per_s = batch_size / step_s
    achieved = flops / step_s
    trainable, total = count_parameters(model)
    result: dict[str, Any] = {
        "preset": args.preset or "config",
        "config": str(args.config),
        "data": source,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "batch_size": batch_size,
        "warmup": args.warmup,
        "steps": args.steps,
        "step_s": step_s,
        "step_cpu_s": step_cpu_s,
        "samples_per_s": samples_per_s,
        "flops_per_step": flops,
        "flops_per_sample": flops / batch_size,
        "achieved_flops_per_s": achieved,
        "gemm": {
            "size": gemm_n,
            "dtype": str(gemm_dtype).removeprefix("torch."),
            "flops_per_s": gemm,
            "flops_per_cpu_s": gemm_cpu,
        },
        "mfu": achieved / gemm,
        # per CPU second (CPU only): step FLOPs / step CPU time over GEMM FLOPs / GEMM CPU time; robust to sharing
        "mfu_cpu_time": (flops / step_cpu_s) / gemm_cpu if device.type == "cpu" else None,
        "loader": loader,
        "samples_per_cpu_s": batch_size / step_cpu_s,
        "bound": _bound(samples_per_s, batch_size / step_cpu_s, loader, device.type == "cpu"),
        "attention": attention_implementations(model),
        "parameters": {"trainable": trainable, "total": total},
        "compile": args.compile,
        "fused_adamw": args.fused_adamw,
        "loss": stats["loss"],
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }
    return result


def run_both(args: argparse.Namespace) -> dict[str, Any]:
    """fp32 then bf16 in this process (same model init, batch and threads); each MFU against its own dtype's GEMM."""
    runs = {dtype: run(argparse.Namespace(**{**vars(args), "dtype": dtype})) for dtype in ("fp32", "bf16")}
    fp32, bf16 = runs["fp32"], runs["bf16"]
    return {
        "preset": fp32["preset"],
        "dtype": "both",
        "cpu_bf16_units": cpu_has_bf16_units() if args.device == "cpu" else None,
        "gemm_flops_per_s": {d: r["gemm"]["flops_per_s"] for d, r in runs.items()},
        "mfu": {d: r["mfu"] for d, r in runs.items()},
        "bf16_speedup_step": fp32["step_s"] / bf16["step_s"],
        "bf16_speedup_gemm": bf16["gemm"]["flops_per_s"] / fp32["gemm"]["flops_per_s"],
        "runs": runs,
    }


def _bound(train_sps: float, train_cpu_sps: float, loader: dict[str, Any] | None, cpu: bool) -> dict | None:
    """'data' where loading alone is slower than the train step. On a CPU both compete for the same cores, so the
    comparison uses samples per CPU second (robust to other jobs sharing the machine)."""
    if loader is None:
        return None
    suffix, train = ("_samples_per_cpu_s", train_cpu_sps) if cpu else ("_samples_per_s", train_sps)
    return {name: "data" if loader[name + suffix] < train else "compute" for name in ("uncached", "cached")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="CMAN config (its loss/peft/training/data sections are used)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", choices=["demo", "small", "base"], help="model sizes (default: the config's model)")
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16", "both"],
        help="bf16: torch.autocast to bfloat16; both: fp32 then bf16 in this process, with their ratio",
    )
    p.add_argument("--steps", type=int, default=10, help="timed train steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, help="default: the config's training.batch_size")
    p.add_argument("--loader-items", type=int, default=128, help="items timed through the data pipeline")
    p.add_argument("--no-loader", action="store_true", help="skip the data-pipeline measurement")
    p.add_argument("--synthetic", action="store_true", help="synthetic files even if data.root exists")
    p.add_argument("--gemm-size", type=int, help="matmul size (default 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--gemm-seconds", type=float, default=3.0)
    p.add_argument("--compile", action="store_true", help="torch.compile encoders and fusion")
    p.add_argument("--fused-adamw", action="store_true", help="fused AdamW (CUDA)")
    p.add_argument("--out", help="JSON output (default bench/results/train_throughput_<preset>.json)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("transformers", "huggingface_hub", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    args = parse_args(argv)
    result = run(args) if args.dtype != "both" else run_both(args)
    out = Path(args.out or REPO / "bench" / "results" / f"train_throughput_{result['preset']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

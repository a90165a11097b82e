"""bf16 where the hardware has bf16 units: the decision from CPU flags (faked), a bf16 train step on CPU, and a
checkpoint trained in bf16 that loads and serves in fp32 (and in bf16, agreeing with fp32)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import tiny_demo_config

from cman.config import ServeConfig
from cman.precision import cpu_flags, cpu_has_bf16_units, dtype_name, resolve_dtype

CPU = torch.device("cpu")
ZEN3 = {"fpu", "sse4_2", "avx", "avx2", "fma"}  # an AMD EPYC without AVX-512
ZEN4 = ZEN3 | {"avx512f", "avx512_bf16"}  # AVX-512-BF16, no AMX
SAPPHIRE_RAPIDS = ZEN3 | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}


@pytest.mark.parametrize(
    ("flags", "expected"), [(ZEN3, None), (ZEN4, torch.bfloat16), (SAPPHIRE_RAPIDS, torch.bfloat16), (set(), None)]
)
def test_auto_picks_bf16_only_where_the_cpu_has_bf16_units(flags, expected) -> None:
    assert resolve_dtype(CPU, "auto", flags=flags) == expected
    assert cpu_has_bf16_units(flags) == (expected is not None)
    # an explicit choice wins over the flags either way
    assert resolve_dtype(CPU, "no", flags=flags) is None and resolve_dtype(CPU, "fp32", flags=flags) is None
    assert resolve_dtype(CPU, "bf16", flags=flags) == torch.bfloat16


def test_flags_are_read_from_cpuinfo_and_the_choice_is_logged_once(tmp_path: Path, caplog) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n\n")
    assert cpu_has_bf16_units(cpu_flags(str(info)))
    assert cpu_flags(str(tmp_path / "absent")) == frozenset()
    with pytest.raises(ValueError, match="'int4' is not one of auto"):
        resolve_dtype(CPU, "int4")
    with caplog.at_level(logging.INFO, logger="cman.precision"):
        for _ in range(3):
            resolve_dtype(CPU, "auto", flags=ZEN4, purpose="test-logging")
    said = [r.getMessage() for r in caplog.records if "test-logging" in r.getMessage()]
    assert len(said) == 1 and "bf16" in said[0] and "AMX / AVX-512-BF16" in said[0]


def test_a_bf16_train_step_on_cpu_gives_finite_loss_and_gradients(demo_root: Path) -> None:
    from cman.losses import CMANLoss
    from cman.models import build_model
    from cman.steps import to_device, train_step_loss
    from cman.training import load_items, make_loader

    config = tiny_demo_config(demo_root)
    items = load_items(config, "train")[:8]
    model = build_model(config, captions=[i.caption for i in items])
    batch = to_device(next(iter(make_loader(config, model, items, train=True, batch_size=8))), CPU)
    terms = train_step_loss(model, CMANLoss.from_config(config.loss), batch, CPU, torch.bfloat16)
    assert terms["loss"].dtype == torch.float32 and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]  # (the unused HF poolers get none)
    assert len(grads) > 0.9 * sum(p.requires_grad for p in model.parameters())
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_a_checkpoint_trained_in_bf16_serves_in_fp32_and_bf16_alike(demo_root: Path, tmp_path: Path) -> None:
    from cman.training import fit
    from serve_app.encoders import ModalityEncoderServer

    config = tiny_demo_config(demo_root, **{"training.epochs": 1, "training.mixed_precision": "bf16"})
    fit(config, tmp_path / "run", resume=False, progress=False)
    checkpoint = tmp_path / "run" / "checkpoints" / "best"
    assert json.loads((checkpoint / "metadata.json").read_text())["precision"] == "bf16"

    captions = ["a small red circle on the left", "a large blue square on the right", "a green star"]
    encode_batch = ModalityEncoderServer.encode.__wrapped__
    tokens = {}
    for dtype in ("fp32", "bf16"):
        server = ModalityEncoderServer(str(checkpoint), "text", ServeConfig(dtype=dtype))
        assert dtype_name(server.dtype) == dtype
        answers = asyncio.run(encode_batch(server, captions))
        assert all(a["tokens"].dtype == np.float32 and np.isfinite(a["tokens"]).all() for a in answers)
        tokens[dtype] = np.concatenate([a["tokens"] for a in answers])  # (seq, width)
    a, b = tokens["fp32"], tokens["bf16"]
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() > 0.98, cosine.min()

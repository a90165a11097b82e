"""The encoder replica's code outside Serve: a HuBERT/wav2vec2 conv stack's minimum input length is enforced per
request, so a 160-399-sample clip fails only its own request, not the batch it shares; check_health runs a forward."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import soundfile as sf
from tiny import pretrained_config, save_tiny_backbones
from transformers import HubertConfig, HubertModel

from cman.models import build_model


def _wav(samples: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, (0.1 * np.sin(np.arange(samples) / 5)).astype(np.float32), 16000, format="WAV")
    return buf.getvalue()


def test_short_clip_fails_alone_and_health_check_runs(tmp_path) -> None:
    from serve_app.encoders import ModalityEncoderServer

    dirs = save_tiny_backbones(tmp_path / "hub", audio="hubert")
    # the standard wav2vec2/HuBERT conv stack (kernels 10,3,3,3,3,2,2; strides 5,2,2,2,2,2,2): 400 samples minimum
    HubertModel(
        HubertConfig(
            conv_dim=(8,) * 7,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
        )
    ).save_pretrained(dirs["audio"])
    build_model(pretrained_config(dirs)).save_pretrained(tmp_path / "ckpt")
    server = ModalityEncoderServer(str(tmp_path / "ckpt"), "audio")
    assert server.min_samples == 400

    # one batch of three, as @serve.batch would hand it over (the batching queue itself needs a Serve replica)
    encode_batch = ModalityEncoderServer.encode.__wrapped__
    short, at_limit, long = asyncio.run(encode_batch(server, [_wav(n) for n in (399, 400, 16000)]))
    assert short["status"] == 415 and "needs at least 400" in short["error"]
    assert at_limit["tokens"].shape[0] >= 1 and long["tokens"].shape[0] > at_limit["tokens"].shape[0]
    assert server.stats()["max_batch_size_seen"] == 3  # the three shared one batch
    server.check_health()

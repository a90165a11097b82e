"""Preprocessing cache: exact features, invalidation on processor/file changes, data-sized AST audio."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from cman.config import from_dict
from cman.data.cache import FeatureCache, audio_max_length, fit_audio_length
from cman.data.dataset import CMANDataset, Collator, load_split
from cman.data.errors import DataError
from cman.data.processors import build_processor
from cman.modality import Modality
from cman.models.cman import build_model

CAPTIONS = ["a red circle on the left", "a blue square on the right", "a green star", "two small yellow triangles"]
SECONDS = [0.3, 0.55, 0.8, 1.2]


def _config(root: Path, **audio):
    return from_dict(
        {
            "model": {
                "text": {
                    "init": {
                        "model_type": "roberta",
                        "hidden_size": 32,
                        "num_hidden_layers": 1,
                        "num_attention_heads": 2,
                        "intermediate_size": 64,
                        "max_position_embeddings": 34,
                    },
                    "max_length": 16,
                    "freeze_base": False,
                },
                "audio": {
                    "init": {
                        "model_type": "audio-spectrogram-transformer",
                        "hidden_size": 32,
                        "num_hidden_layers": 1,
                        "num_attention_heads": 2,
                        "intermediate_size": 64,
                        "num_mel_bins": 32,
                        "max_length": 128,
                        "patch_size": 16,
                        "frequency_stride": 16,
                        "time_stride": 16,
                    },
                    "freeze_base": False,
                    **audio,
                },
                "image": {
                    "init": {
                        "model_type": "vit",
                        "hidden_size": 32,
                        "num_hidden_layers": 1,
                        "num_attention_heads": 2,
                        "intermediate_size": 64,
                        "image_size": 32,
                        "patch_size": 8,
                    },
                    "freeze_base": False,
                },
                "fusion": {"layers": 1, "heads": 2, "width": 32, "ffn": 64},
                "embedding_dim": 32,
            },
            "data": {"root": str(root)},
        }
    )


@pytest.fixture()
def dataset_root(tmp_path: Path) -> Path:
    """Four real items in the seed layout: tone WAVs of different lengths, PNGs, captions (one without image)."""
    root = tmp_path / "data"
    for sub in ("audio/train", "images/train", "metadata"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for i, (caption, seconds) in enumerate(zip(CAPTIONS, SECONDS, strict=True)):
        t = np.arange(int(16000 * seconds)) / 16000
        sf.write(root / "audio" / "train" / f"{i}.wav", (0.3 * np.sin(2 * np.pi * 220 * (i + 1) * t)), 16000)
        entry = {"id": f"item{i}", "caption": caption, "audio_filename": f"{i}.wav", "group": str(i % 2)}
        if i != 3:
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
                root / "images" / "train" / f"{i}.png"
            )
            entry["image_filename"] = f"{i}.png"
        entries.append(entry)
    (root / "metadata" / "train_metadata.json").write_text(json.dumps(entries))
    return root


def _processors(config):
    return {m: build_processor(m, config.model.encoder(m), CAPTIONS) for m in config.model.modalities}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for modality in a:
        assert a[modality].keys() == b[modality].keys()
        for key in a[modality]:
            assert a[modality][key].dtype == b[modality][key].dtype
            assert torch.equal(a[modality][key], b[modality][key]), (modality, key)


def test_cached_features_equal_uncached_exactly(dataset_root, tmp_path):
    config = _config(dataset_root)
    items = load_split(dataset_root, "train")
    processors = _processors(config)
    cache = FeatureCache(tmp_path / "cache", items, processors)
    assert sorted(m.value for m in cache.built) == ["audio", "image", "text"]
    plain = CMANDataset(items, processors)
    for index, item in enumerate(items):
        _assert_same(cache.features(index), plain.features(item))
    assert Modality.IMAGE not in cache.features(3)  # item without an image stays without one
    collate = Collator(processors)
    cached_ds = CMANDataset(items, processors, store=cache)
    a, b = collate([cached_ds[i] for i in range(4)]), collate([plain[i] for i in range(4)])
    _assert_same(a["inputs"], b["inputs"])
    assert a["ids"] == b["ids"] and torch.equal(a["groups"], b["groups"])


def test_cache_reused_then_invalidated_by_processor_and_file_changes(dataset_root, tmp_path):
    config = _config(dataset_root)
    items = load_split(dataset_root, "train")
    processors = _processors(config)
    first = FeatureCache(tmp_path / "cache", items, processors)
    again = FeatureCache(tmp_path / "cache", items, processors)
    assert again.built == []  # same processors + same files: read, not rebuilt
    _assert_same(again.features(1), first.features(1))

    # processor config change: AST pads to a different max_length -> a new audio cache, new shapes
    processors[Modality.AUDIO].extractor.max_length = 64
    changed = FeatureCache(tmp_path / "cache", items, processors)
    assert changed.built == [Modality.AUDIO]
    assert changed.features(0)[Modality.AUDIO]["input_values"].shape[0] == 64
    assert first.features(0)[Modality.AUDIO]["input_values"].shape[0] == 128

    # source change: a rewritten image (new size/mtime) -> the image cache is rebuilt with the new pixels
    path = dataset_root / "images" / "train" / "0.png"
    Image.new("RGB", (40, 40), (255, 255, 255)).save(path)
    os.utime(path, ns=(1, 1))
    touched = FeatureCache(tmp_path / "cache", items, processors)
    assert touched.built == [Modality.IMAGE]
    fresh = CMANDataset(items, processors).features(items[0])
    _assert_same(touched.features(0), fresh)
    assert not torch.equal(
        touched.features(0)[Modality.IMAGE]["pixel_values"], first.features(0)[Modality.IMAGE]["pixel_values"]
    )


def test_bad_file_is_a_data_error_from_the_cache(dataset_root, tmp_path):
    (dataset_root / "audio" / "train" / "2.wav").write_bytes(b"not audio")
    config = _config(dataset_root)
    items = load_split(dataset_root, "train")
    processors = _processors(config)
    cache = FeatureCache(tmp_path / "cache", items, processors)
    with pytest.raises(DataError, match="2.wav"):
        cache.features(2)
    assert CMANDataset(items, processors, skip_bad_items=True, store=cache)[2] is None
    assert Modality.AUDIO in cache.features(1)


def test_audio_length_from_data_sizes_a_fresh_ast(dataset_root):
    items = load_split(dataset_root, "train")
    assert audio_max_length(items, percentile=100) == 128  # 1.2 s -> 120 frames -> rounded up to 128
    assert audio_max_length(items, percentile=0) == 32  # 0.3 s -> 30 frames -> 32
    config = fit_audio_length(_config(dataset_root, length_percentile=50), items)
    frames = audio_max_length(items, percentile=50)
    assert config.model.audio.init["max_length"] == frames == config.model.audio.max_length
    model = build_model(config, captions=CAPTIONS)
    assert model.encoders["audio"].base_config.max_length == frames
    assert model.processors[Modality.AUDIO].extractor.max_length == frames
    untouched = _config(dataset_root)
    assert fit_audio_length(untouched, items) is untouched  # no percentile: the config's max_length stays

"""Audio and image augmentation (seeded, training only, never touching cached features), per-utterance
normalisation, the speaker-balanced sampler, the digits importer's speaker field and the leave-one-speaker-out fold
plan."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import tiny_demo_config

from cman.config import AudioAugmentConfig, ImageAugmentConfig
from cman.data.augment import AudioAugment, ImageAugment, real_length
from cman.data.dataset import load_split
from cman.data.processors import AudioProcessor, fbank_frames, utterance_normalize
from cman.data.sampler import NeighbourGroupSampler, SpeakerBalancedSampler, neighbour_sampler, speaker_sampler
from cman.engine import make_loader
from cman.models.cman import build_model

FULL = AudioAugmentConfig(
    enabled=True,
    tempo=0.2,
    freq_warp=0.1,
    gain=0.1,
    noise=0.05,
    shift_frames=8,
    time_masks=2,
    time_mask_width=6,
    freq_masks=2,
    freq_mask_width=4,
)


def _spectrogram(frames: int = 64, real: int = 40, bins: int = 16) -> torch.Tensor:
    x = torch.full((frames, bins), 0.47)  # AST pads with one constant frame
    x[:real] = torch.randn(real, bins)
    return x


def test_real_length_finds_the_padding() -> None:
    assert real_length(_spectrogram(64, 40)) == 40
    assert real_length(_spectrogram(64, 64)) == 64
    assert real_length(torch.zeros(10, 4)) == 1  # all padding: one frame kept


def test_augmentation_is_seeded_changes_features_and_leaves_input_alone() -> None:
    x = _spectrogram()
    before = x.clone()
    augment = AudioAugment(FULL)
    torch.manual_seed(3)
    a = augment({"input_values": x})["input_values"]
    torch.manual_seed(3)
    b = augment({"input_values": x})["input_values"]
    c = augment({"input_values": x})["input_values"]
    assert torch.equal(a, b) and not torch.equal(a, c)  # same seed, same result; next draw differs
    assert a.shape == x.shape and not torch.equal(a, x)
    assert torch.equal(x, before)  # the (cached) input is never modified


def test_each_augmentation_alone() -> None:
    x = _spectrogram(64, 40)
    torch.manual_seed(0)
    slow = AudioAugment(AudioAugmentConfig(enabled=True, tempo=0.5))
    lengths = {real_length(slow({"input_values": x})["input_values"]) for _ in range(20)}
    assert len(lengths) > 3 and min(lengths) < 40 < max(lengths)  # speed perturbation changes the duration
    shifted = AudioAugment(AudioAugmentConfig(enabled=True, shift_frames=10))({"input_values": x})["input_values"]
    start = int((shifted != x[-1]).any(dim=1).float().argmax())
    assert torch.equal(shifted[start : start + 40], x[:40])  # same frames, later
    masked = AudioAugment(AudioAugmentConfig(enabled=True, freq_masks=1, freq_mask_width=16))
    torch.manual_seed(1)
    out = masked({"input_values": x})["input_values"]
    assert (out == 0.47).all(dim=0).any() or torch.equal(out, x)  # a whole mel band set to the padding value
    wave = torch.randn(1600)
    w = AudioAugment(AudioAugmentConfig(enabled=True, tempo=0.2, gain=6.0, shift_frames=2))({"input_values": wave})
    assert w["input_values"].ndim == 1 and w["input_values"].shape[0] != 1600


def test_utterance_normalisation() -> None:
    frames = fbank_frames(16000, 16000)
    assert frames == 98  # Kaldi: (16000 - 400) // 160 + 1
    x = _spectrogram(128, frames, 8) * 3 + 5
    y = utterance_normalize(x, frames)
    assert torch.allclose(y[:frames].mean(0), torch.zeros(8), atol=1e-5) and bool((y[frames:] == 0).all())
    from transformers import ASTFeatureExtractor

    proc = AudioProcessor(ASTFeatureExtractor(num_mel_bins=16, max_length=128), normalize="utterance")
    rng = np.random.default_rng(0)
    sound = (np.sin(np.linspace(0, 800, 8000)) + rng.normal(0, 0.3, 8000)).astype(np.float32)
    loud, quiet = proc.features(sound)["input_values"], proc.features(sound * 0.25)["input_values"]
    assert torch.allclose(loud, quiet, atol=1e-3)  # a gain change is normalised away
    plain = AudioProcessor(ASTFeatureExtractor(num_mel_bins=16, max_length=128))
    assert not torch.allclose(plain.features(sound)["input_values"], plain.features(sound * 0.25)["input_values"])
    with pytest.raises(ValueError, match="normalize"):
        AudioProcessor(ASTFeatureExtractor(), normalize="speaker")


def test_speaker_sampler_balances_every_batch() -> None:
    speakers = ["a"] * 40 + ["b"] * 20 + ["c"] * 10 + [None] * 2
    sampler = SpeakerBalancedSampler(speakers, torch.Generator().manual_seed(0))
    order = list(sampler)
    assert len(order) == len(speakers) and set(order) <= set(range(len(speakers)))
    for start in range(0, 64, 8):  # each batch of 8 has every speaker 1-3 times, although a has 4x c's items
        counts = Counter(speakers[i] for i in order[start : start + 8])
        assert set(counts) <= {"a", "b", "c", None} and max(counts.values()) <= 3
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert list(SpeakerBalancedSampler(speakers, g1)) == list(SpeakerBalancedSampler(speakers, g2))
    assert speaker_sampler([type("I", (), {"speaker": "a"})()] * 3) is None  # one speaker: plain shuffling


def test_neighbour_sampler_puts_one_attribute_neighbours_in_each_batch() -> None:
    """Every batch is anchors followed by their one-attribute neighbours; an epoch has one index per item."""
    import itertools

    groups = ["-".join(g) for g in itertools.product("sl", "rgb", "ab") for _ in range(3)]  # 12 groups x 3 items
    sampler = NeighbourGroupSampler(groups, batch_size=8, generator=torch.Generator().manual_seed(0))
    assert sorted(sampler.neighbours["s-r-a"]) == ["l-r-a", "s-b-a", "s-g-a", "s-r-b"]
    order = list(sampler)
    assert len(order) == len(groups)
    for start in range(0, len(order) - 8, 8):  # batches of 8: no group twice; the first one's 4 neighbours in it
        batch = [groups[i] for i in order[start : start + 8]]
        assert len(set(batch)) == 8
        assert set(sampler.neighbours[batch[0]]) <= set(batch[1:5])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert list(NeighbourGroupSampler(groups, 8, generator=g1)) == list(NeighbourGroupSampler(groups, 8, generator=g2))
    unrelated = [type("I", (), {"group": f"id:{k}"})() for k in range(4)]
    assert neighbour_sampler(unrelated, 2) is None  # no structure: plain shuffling


def test_loader_augments_training_only_and_stays_reproducible_without(demo_root: Path) -> None:
    plain = tiny_demo_config(demo_root, **{"data.max_items": 8})
    on = plain.with_overrides({"data.audio_augment": FULL.model_dump()})
    model = build_model(plain, captions=["a small red circle on the left"])
    items = load_split(demo_root, "train", 8)

    def first_audio(config, train: bool) -> torch.Tensor:
        loader = make_loader(config, model, items, train=train)
        loader.generator.manual_seed(0)
        torch.manual_seed(0)
        return next(iter(loader))["inputs"]["audio"]["input_values"]

    assert torch.equal(first_audio(plain, True), first_audio(plain, True))  # no augmentation: bit-identical
    assert torch.equal(first_audio(on, True), first_audio(on, True))  # seeded
    assert not torch.equal(first_audio(on, True), first_audio(plain, True))
    assert torch.equal(first_audio(on, False), first_audio(plain, False))  # evaluation never augments


def test_image_augmentation_shifts_within_its_range_and_is_seeded() -> None:
    x = torch.zeros(3, 16, 16)
    x[:, 8, 8] = 1.0  # one bright pixel
    before = x.clone()
    augment = ImageAugment(ImageAugmentConfig(enabled=True, shift_pixels=2))
    moves = set()
    for seed in range(40):
        torch.manual_seed(seed)
        y = augment({"pixel_values": x})["pixel_values"]
        assert y.shape == x.shape and float(y.sum()) == 3.0  # moved, not blurred or lost
        row, col = (int(v) for v in torch.nonzero(y[0])[0])
        assert abs(row - 8) <= 2 and abs(col - 8) <= 2
        moves.add((row - 8, col - 8))
    assert len(moves) > 10  # both axes, both directions
    assert torch.equal(x, before)
    torch.manual_seed(5)
    a = ImageAugment(ImageAugmentConfig(enabled=True, brightness=0.2, noise=0.1))({"pixel_values": x})
    torch.manual_seed(5)
    b = ImageAugment(ImageAugmentConfig(enabled=True, brightness=0.2, noise=0.1))({"pixel_values": x})
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and not torch.equal(a["pixel_values"], x)


def test_loader_augments_images_for_training_only(demo_root: Path) -> None:
    plain = tiny_demo_config(demo_root, **{"data.max_items": 8, "data.image_augment.enabled": False})
    on = plain.with_overrides({"data.image_augment": {"enabled": True, "shift_pixels": 3, "brightness": 0.1}})
    model = build_model(plain, captions=["a small red circle on the left"])
    items = load_split(demo_root, "train", 8)

    def first_batch(config, train: bool) -> dict:
        loader = make_loader(config, model, items, train=train)
        loader.generator.manual_seed(0)
        torch.manual_seed(0)
        return next(iter(loader))["inputs"]

    assert torch.equal(first_batch(on, True)["image"]["pixel_values"], first_batch(on, True)["image"]["pixel_values"])
    assert not torch.equal(
        first_batch(on, True)["image"]["pixel_values"], first_batch(plain, True)["image"]["pixel_values"]
    )
    audio = [first_batch(c, True)["audio"]["input_values"] for c in (on, plain)]
    assert torch.equal(*audio)  # images only
    evaluation = [first_batch(c, False)["image"]["pixel_values"] for c in (on, plain)]
    assert torch.equal(*evaluation)  # evaluation never augments


def test_digits_speakers_and_fold_plan(tmp_path: Path) -> None:
    from bench.digits_cv import fold_plan, summarise
    from cman.data.importers import import_digits

    plan = fold_plan(["theo", "george", "jackson", "lucas", "nicolas", "yweweler"])
    assert sorted(f["test"] for f in plan) == sorted(f["val"] for f in plan)  # each speaker tested and validated once
    for fold in plan:
        assert fold["test"] != fold["val"] and len(fold["train"]) == 4
        assert {fold["test"], fold["val"], *fold["train"]} == {f["test"] for f in plan}
    with pytest.raises(ValueError, match="at least 3"):
        fold_plan(["a", "b"])
    fsdd = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd"
    fold = plan[0]
    import_digits(fsdd, tmp_path, test_speakers=[fold["test"]], val_speakers=[fold["val"]], limit_per_speaker_digit=1)
    for split, speakers in (("test", {fold["test"]}), ("val", {fold["val"]}), ("train", set(fold["train"]))):
        items = load_split(tmp_path, split)
        assert {i.speaker for i in items} == speakers and len(items) == 10 * len(speakers)
    raw = json.loads((tmp_path / "metadata" / "train_metadata.json").read_text())
    assert all(entry["speaker"] in entry["id"] for entry in raw)
    folds = [{"metrics": {"audio->text": {"P@1": p, "mAP@R": 50.0}}} for p in (90.0, 100.0)]
    assert summarise(folds)["audio->text"]["P@1"] == {"mean": 95.0, "std": 5.0, "min": 90.0}


def test_digits_cv_averages_seeds_within_a_fold_and_summarises_each_seed(monkeypatch, tmp_path: Path) -> None:
    """--seeds: a fold's metrics are the mean of its runs; summary_by_seed is each seed's own six-fold view."""
    import argparse

    from bench import digits_cv

    def fake_train(work: Path, seed: int | None, args: argparse.Namespace) -> dict:  # training is not the point
        p = {("a", 0): 60.0, ("a", 1): 80.0, ("b", 0): 90.0, ("b", 1): 100.0}[(work.name, seed)]
        return {"seed": seed, "seconds": 1.0, "best_epoch": 1, "metrics": {"audio->text": {"P@1": p, "mAP@R": p}}}

    monkeypatch.setattr(digits_cv, "train_once", fake_train)
    monkeypatch.setattr(digits_cv, "fsdd_speakers", lambda _: ["a", "b", "c"])
    monkeypatch.setattr("cman.data.importers.import_digits", lambda *a, **k: {"train": 1, "val": 1, "test": 1})
    out = tmp_path / "cv.json"
    result = digits_cv.main(["--folds", "a", "b", "--seeds", "0", "1", "--work-dir", str(tmp_path), "--out", str(out)])
    assert [f["metrics"]["audio->text"]["P@1"] for f in result["folds"]] == [70.0, 95.0]
    assert [len(f["runs"]) for f in result["folds"]] == [2, 2] and result["folds"][0]["seconds"] == 2.0
    assert result["summary"]["audio->text"]["P@1"] == {"mean": 82.5, "std": 12.5, "min": 70.0}
    by_seed = result["summary_by_seed"]
    assert by_seed["0"]["audio->text"]["P@1"]["mean"] == 75.0 and by_seed["1"]["audio->text"]["P@1"]["mean"] == 90.0
    assert json.loads(out.read_text())["seeds"] == [0, 1]

"""Demo dataset generator and espeak-ng TTS: real files, no mocks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from cman.data.dataset import load_split
from cman.data.demo import (
    ALL_SCENES,
    PARAPHRASE_SPLIT,
    PARAPHRASE_WORDS,
    POSITION_PHRASES,
    SPLITS,
    generate_demo_dataset,
)
from cman.data.tts import VOICES, synthesize

COUNTS = {"train": 12, "val": 4, "test": 8}
ENTRY_KEYS = {"id", "caption", "audio_filename", "image_filename", "group"}


def _metadata(root: Path, split: str) -> list[dict[str, str]]:
    return json.loads((root / "metadata" / f"{split}_metadata.json").read_text())


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("other", 1)):
        out = tmp_path_factory.mktemp(f"demo_{name}")
        assert generate_demo_dataset(out, seed=seed, counts=COUNTS) == {**COUNTS, PARAPHRASE_SPLIT: COUNTS["test"]}
        runs[name] = out
    return runs


def test_layout_and_relative_paths(demo_runs: dict[str, Path]) -> None:
    root = demo_runs["a"]
    ids = []
    for split in SPLITS:
        entries = _metadata(root, split)
        assert len(entries) == COUNTS[split]
        for entry in entries:
            assert set(entry) == ENTRY_KEYS
            assert "/" not in entry["audio_filename"] and "/" not in entry["image_filename"]
            assert (root / "audio" / split / entry["audio_filename"]).is_file()
            assert (root / "images" / split / entry["image_filename"]).is_file()
            ids.append(entry["id"])
    assert len(ids) == len(set(ids))
    info = json.loads((root / "dataset.json").read_text())
    assert info["seed"] == 0 and info["counts"] == COUNTS and info["generator"] == "cman.data.demo"


def test_same_seed_identical_other_seed_different(demo_runs: dict[str, Path]) -> None:
    a, b, other = demo_runs["a"], demo_runs["b"], demo_runs["other"]
    for split in SPLITS:
        assert _metadata(a, split) == _metadata(b, split)
    assert _metadata(a, "train") != _metadata(other, "train")
    for entry in _metadata(a, "test")[:3]:
        for sub, key in (("audio", "audio_filename"), ("images", "image_filename")):
            name = entry[key]
            assert (a / sub / "test" / name).read_bytes() == (b / sub / "test" / name).read_bytes()


def test_audio_is_16k_mono_speech(demo_runs: dict[str, Path]) -> None:
    root = demo_runs["a"]
    for entry in _metadata(root, "val"):
        wave, sr = sf.read(root / "audio" / "val" / entry["audio_filename"], dtype="float32")
        assert sr == 16_000 and wave.ndim == 1
        assert 0.5 < len(wave) / sr <= 2.5
        assert float(np.sqrt(np.mean(wave**2))) > 0.02


def test_images_are_rgb_and_not_blank(demo_runs: dict[str, Path]) -> None:
    root = demo_runs["a"]
    entry = _metadata(root, "train")[0]
    image = np.asarray(Image.open(root / "images" / "train" / entry["image_filename"]))
    assert image.shape == (96, 96, 3)
    assert image.std() > 10  # a coloured shape on a grey background


def test_caption_names_exactly_the_group_attributes(demo_runs: dict[str, Path]) -> None:
    root = demo_runs["a"]
    groups = {scene.group for scene in ALL_SCENES}
    for split in SPLITS:
        for entry in _metadata(root, split):
            assert entry["group"] in groups
            size, color, shape, position = entry["group"].split("-")
            words = entry["caption"].split()
            for word in (size, color, shape):
                assert word in words, (word, entry)
            assert POSITION_PHRASES[position] in entry["caption"]


def _words(caption: str) -> set[str]:
    return set(caption.replace("?", " ").replace(",", " ").split())


def test_paraphrase_split_rewords_test_with_unseen_words(demo_runs: dict[str, Path]) -> None:
    root = demo_runs["a"]
    test, para = _metadata(root, "test"), _metadata(root, PARAPHRASE_SPLIT)
    assert len(para) == len(test) and len(load_split(root, PARAPHRASE_SPLIT)) == len(test)
    seen = set().union(*(_words(e["caption"]) for split in SPLITS for e in _metadata(root, split)))
    function_words = {"a", "the", "is", "in"}
    for orig, new in zip(test, para, strict=True):
        assert new["group"] == orig["group"] and new["caption"] != orig["caption"]
        for key, sub in (("audio_filename", "audio"), ("image_filename", "images")):  # same media as test
            same = (root / sub / PARAPHRASE_SPLIT / new[key]).read_bytes() == (
                root / sub / "test" / orig[key]
            ).read_bytes()
            assert same
        assert _words(new["caption"]) & seen <= function_words, new["caption"]
        # every attribute of the group is named by one of its synonyms
        size, color, shape, position = orig["group"].split("-")
        for attribute in (size, color, shape, position):
            assert any(word in new["caption"] for word in PARAPHRASE_WORDS[attribute]), (attribute, new["caption"])
    assert len({e["caption"].split()[0] for e in para}) > 1  # several sentence shapes


def test_refuses_foreign_directory_and_replaces_own(tmp_path: Path) -> None:
    foreign = tmp_path / "user"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="non-empty"):
        generate_demo_dataset(foreign, counts={"train": 1, "val": 1, "test": 1})
    assert (foreign / "precious.txt").read_text() == "keep me"

    own = tmp_path / "demo"
    generate_demo_dataset(own, counts={"train": 6, "val": 1, "test": 1})
    generate_demo_dataset(own, counts={"train": 2, "val": 1, "test": 1})
    assert len(list((own / "audio" / "train").iterdir())) == 2
    assert len(list((own / "images" / "train").iterdir())) == 2


def test_unknown_size_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown demo size"):
        generate_demo_dataset(tmp_path / "x", size="huge")


def test_tts_speech_grows_with_text() -> None:
    short, sr = synthesize("a red star")
    long, sr_long = synthesize("there is a small yellow triangle on the right side of the picture")
    assert sr == sr_long > 0
    assert short.dtype == np.float32 and np.abs(short).max() <= 1.0
    assert float(np.sqrt(np.mean(short**2))) > 0.01
    assert len(long) > 2 * len(short)


def test_tts_voices_are_reproducible() -> None:
    first = {voice: synthesize("a blue circle", voice=voice, rate=170, pitch=40)[0] for voice in VOICES}
    synthesize("something else in between", voice="en")
    for voice in VOICES:
        again, _ = synthesize("a blue circle", voice=voice, rate=170, pitch=40)
        assert np.array_equal(first[voice], again), voice


def test_tts_unknown_voice() -> None:
    with pytest.raises(ValueError, match="not found"):
        synthesize("hello", voice="no-such-voice")

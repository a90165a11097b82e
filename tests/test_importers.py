"""Importers on the real data in ../shared/data (FSDD + sklearn digits, COCO mini): no mocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf

from cman.data.demo import SPLITS
from cman.data.importers import NUMBER_WORDS, import_coco, import_digits

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
TAKES = 5  # takes per (speaker, digit) in the quick digits import


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(
            f"test data {path} is missing: these tests read the shared real data beside the repo (../shared/data)"
        )
    return path


def _metadata(root: Path, split: str) -> list[dict[str, str]]:
    return json.loads((root / "metadata" / f"{split}_metadata.json").read_text())


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    counts = import_digits(_require(DATA_DIR / "fsdd"), out, limit_per_speaker_digit=TAKES)
    assert counts == {"train": 4 * 10 * TAKES, "val": 10 * TAKES, "test": 10 * TAKES}
    return out


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("coco")
    counts = import_coco(_require(DATA_DIR / "coco_mini"), out, limit_images=2, workers=2)
    assert counts == {"train": 10, "val": 10, "test": 10}
    return out


def test_digits_split_by_speaker(digits_root: Path) -> None:
    speakers = {split: {e["id"].split("_")[2] for e in _metadata(digits_root, split)} for split in SPLITS}
    assert speakers["test"] == {"theo"}
    assert speakers["val"] == {"george"}
    assert speakers["train"] == {"jackson", "lucas", "nicolas", "yweweler"}


def test_digits_groups_are_classes_and_captions_words(digits_root: Path) -> None:
    for split in SPLITS:
        entries = _metadata(digits_root, split)
        assert {e["group"] for e in entries} == {str(d) for d in range(10)}
        for entry in entries:
            assert entry["caption"] == NUMBER_WORDS[int(entry["group"])]
            assert entry["id"].split("_")[1] == entry["group"]


def test_digits_image_pools_disjoint(digits_root: Path) -> None:
    images = {split: {e["image_filename"] for e in _metadata(digits_root, split)} for split in SPLITS}
    assert not images["train"] & images["test"]
    assert not images["train"] & images["val"]
    assert not images["val"] & images["test"]
    for split in SPLITS:
        assert {p.name for p in (digits_root / "images" / split).iterdir()} == images[split]


def test_digits_audio_resampled(digits_root: Path) -> None:
    entry = _metadata(digits_root, "test")[0]
    wave, sr = sf.read(digits_root / "audio" / "test" / entry["audio_filename"])
    original, original_sr = sf.read(DATA_DIR / "fsdd" / "recordings" / f"{entry['id'].removeprefix('fsdd_')}.wav")
    assert sr == 16_000 and original_sr == 8_000
    assert abs(len(wave) / sr - len(original) / original_sr) < 0.01
    assert abs(wave).max() == pytest.approx(abs(original).max(), rel=0.2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"test_speakers": ("nobody",)}, "unknown speaker"), ({"val_speakers": ("theo",)}, "both")],
)
def test_digits_bad_speakers(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        import_digits(_require(DATA_DIR / "fsdd"), tmp_path / "out", **kwargs)


def test_digits_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        import_digits(tmp_path / "absent", tmp_path / "out")


def test_coco_five_items_per_image(coco_root: Path) -> None:
    source = {}
    for line in (DATA_DIR / "coco_mini" / "captions_all.jsonl").read_text().splitlines():
        row = json.loads(line)
        source[str(row["image_id"])] = row
    for split in SPLITS:
        entries = _metadata(coco_root, split)
        by_group: dict[str, list[dict[str, str]]] = {}
        for entry in entries:
            by_group.setdefault(entry["group"], []).append(entry)
        assert len(by_group) == 2
        for group, items in by_group.items():
            assert len(items) == 5
            assert [e["caption"] for e in items] == [c.strip() for c in source[group]["captions"]]
            assert len({e["image_filename"] for e in items}) == 1
            copied = coco_root / "images" / split / items[0]["image_filename"]
            assert copied.read_bytes() == (DATA_DIR / "coco_mini" / source[group]["file"]).read_bytes()
            if source[group]["split"] == "train2017":
                assert split == "train"
            else:
                assert split in ("val", "test")
        for entry in entries:
            wave, sr = sf.read(coco_root / "audio" / split / entry["audio_filename"])
            assert sr == 16_000 and len(wave) > sr // 2 and abs(wave).max() > 0.1


def test_coco_marks_speech_synthetic(coco_root: Path) -> None:
    assert "synthetic" in (coco_root / "README.md").read_text()
    assert "espeak-ng" in json.loads((coco_root / "dataset.json").read_text())["speech"]


def test_coco_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="captions_all.jsonl"):
        import_coco(tmp_path / "absent", tmp_path / "out")

"""Every kind of bad data file is an error naming the item and the file; validate lists them all."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from tiny import CAPTIONS, REPO

from cman import cli
from cman.config import load_config
from cman.data.dataset import CMANDataset, Collator, load_split
from cman.data.errors import DataError
from cman.data.processors import build_processor
from cman.modality import Modality


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims a huge image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


BAD_FILES = {  # item id -> (modality, file name, bytes or writer, expected message)
    "missing_audio": ("audio", "nope.wav", None, r"audio file .*nope\.wav \(item missing_audio\) does not exist"),
    "corrupt_audio": (
        "audio",
        "junk.wav",
        b"RIFF....not audio at all",
        r"junk\.wav \(item corrupt_audio\) could not be decoded",
    ),
    "empty_audio": ("audio", "empty.wav", "empty-wav", r"empty\.wav \(item empty_audio\) is empty or too short"),
    "missing_image": ("image", "nope.png", None, r"image file .*nope\.png \(item missing_image\) does not exist"),
    "corrupt_image": (
        "image",
        "junk.png",
        b"\x89PNG garbage",
        r"junk\.png \(item corrupt_image\) could not be decoded",
    ),
    "truncated_image": ("image", "cut.png", "truncated-png", r"cut\.png \(item truncated_image\) could not be decoded"),
    "bomb_image": ("image", "bomb.png", _bomb_png(), r"bomb\.png \(item bomb_image\) is (too large|100000x100000)"),
}


@pytest.fixture()
def dataset(tmp_path):
    root = tmp_path / "ds"
    for sub in ("audio/train", "images/train", "metadata"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    sf.write(root / "audio/train/good.wav", (rng.standard_normal(16000) * 0.1).astype("float32"), 16000)
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(root / "images/train/good.png")
    entries = [{"id": "good", "caption": CAPTIONS[0], "audio_filename": "good.wav", "image_filename": "good.png"}]
    for item_id, (modality, name, content, _) in BAD_FILES.items():
        folder = root / ("audio/train" if modality == "audio" else "images/train")
        if content == "empty-wav":
            sf.write(folder / name, np.zeros(0, dtype="float32"), 16000)
        elif content == "truncated-png":
            good = (root / "images/train/good.png").read_bytes()
            (folder / name).write_bytes(good[: len(good) // 2])
        elif content is not None:
            (folder / name).write_bytes(content)
        entries.append({"id": item_id, "caption": CAPTIONS[1], f"{modality}_filename": name})
    entries.append({"id": "empty_caption", "caption": "   ", "image_filename": "good.png"})
    (root / "metadata/train_metadata.json").write_text(json.dumps(entries))
    return root


def _processors():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    return {m: build_processor(m, cfg.model.encoder(m), CAPTIONS * 3) for m in Modality}


@pytest.mark.parametrize("item_id", [*BAD_FILES, "empty_caption"])
def test_bad_item_error_names_item_and_file(dataset, item_id):
    items = {i.id: i for i in load_split(dataset, "train")}
    ds = CMANDataset([items[item_id]], _processors())
    expected = BAD_FILES[item_id][3] if item_id in BAD_FILES else r"caption \(item empty_caption\) is empty"
    with pytest.raises(DataError, match=expected) as info:
        ds[0]
    assert info.value.item_id == item_id


def test_skip_bad_items_counts_them(dataset):
    items = load_split(dataset, "train")
    ds = CMANDataset(items, _processors(), skip_bad_items=True)
    batch = Collator(ds.processors)([ds[i] for i in range(len(ds))])
    assert batch["ids"] == ["good"] and batch["skipped"] == len(items) - 1
    assert batch["present"][Modality.AUDIO].tolist() == [True]
    assert batch["groups"].tolist() == [0]


def test_validate_lists_every_problem(dataset, tmp_path, capsys):
    code = cli.main(
        [
            "data",
            "validate",
            "--config",
            str(REPO / "configs/demo.yaml"),
            "--set",
            f"data.root={dataset}",
            "--split",
            "train",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert f"train: {len(BAD_FILES) + 2} items, {len(BAD_FILES) + 1} problems" in out
    for item_id in [*BAD_FILES, "empty_caption"]:
        assert f"(item {item_id})" in out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"metadata file .*train_metadata\.json not found"),
        ("{not json", r"train_metadata\.json is not valid JSON"),
        ('{"id": 1}', r"must hold a JSON list"),
        ('[{"caption": "x"}]', r"entry 0 must be an object with an \"id\""),
        ('[{"id": "a", "caption": "x"}, {"id": "a", "caption": "y"}]', r"duplicate id 'a' \(entry 1\)"),
        ('[{"id": "a"}]', r"item a has no caption, audio or image"),
    ],
)
def test_bad_metadata(tmp_path, content, message):
    (tmp_path / "metadata").mkdir()
    if content is not None:
        (tmp_path / "metadata/train_metadata.json").write_text(content)
    with pytest.raises(DataError, match=message):
        load_split(tmp_path, "train")


def test_missing_modalities_and_groups(tmp_path):
    (tmp_path / "metadata").mkdir()
    entries = [{"id": "a", "caption": "x", "group": 7}, {"id": "b", "image_filename": "b.png"}]
    (tmp_path / "metadata/val_metadata.json").write_text(json.dumps(entries))
    a, b = load_split(tmp_path, "val")
    assert a.group == "7" and b.group == "id:b"
    assert a.has(Modality.TEXT) and not a.has(Modality.IMAGE) and b.image_path == tmp_path / "images/val/b.png"


def test_audio_is_mono_resampled_and_features_have_encoder_shapes(tmp_path):
    stereo_8k = np.stack([np.sin(np.linspace(0, 400, 8000)), np.zeros(8000)], axis=1).astype("float32")
    sf.write(tmp_path / "s.flac", stereo_8k, 8000)
    procs = _processors()
    wave = procs[Modality.AUDIO].load(tmp_path / "s.flac")
    assert wave.ndim == 1 and abs(len(wave) - 16000) <= 2  # 1 s at 16 kHz
    feats = procs[Modality.AUDIO].features(wave)["input_values"]
    assert feats.shape == (256, 32) and torch.isfinite(feats).all()  # demo AST: max_length x mel bins
    img = Image.new("RGB", (60, 30), "red")
    img.save(tmp_path / "r.jpg", exif=_rotate_exif())
    pic = procs[Modality.IMAGE].load(tmp_path / "r.jpg")
    assert pic.size == (30, 60)  # EXIF orientation 6 applied
    assert procs[Modality.IMAGE].features(pic)["pixel_values"].shape == (3, 64, 64)


def _rotate_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif.tobytes()

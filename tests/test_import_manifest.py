"""`cman data import-manifest`: a CSV or JSONL manifest of your own media into the seed layout; every broken row
named with its line, nothing written; groups never span splits; the imported data validates, trains and indexes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from media_files import photo, validate_train_index, wav

from cman.data.importing import ImportProblems
from cman.data.manifest import import_manifest

THINGS = ["a red kite", "a brown dog", "a sailing boat", "a green tractor", "a white cat", "a yellow bus"]


def _media(base: Path) -> list[dict[str, str]]:
    """6 photos with 2 captions each, each caption spoken; rows as the manifest names them (relative paths)."""
    rows = []
    for i, thing in enumerate(THINGS):
        image = f"photos/p{i}.{'png' if i % 2 else 'jpg'}"
        photo(base / image, seed=i)
        for n, where in enumerate(("in the sky", "by the sea")):
            audio = f"speech/p{i}_{n}.wav"
            wav(base / audio, seed=10 * i + n)
            rows.append({"image": image, "audio": audio, "text": f"{thing} {where}", "speaker": f"s{n}"})
    return rows


def _csv(path: Path, header: list[str], rows: list[list[str]]) -> list[str]:
    """Write a CSV; returns the `file:line` of each data row."""
    lines = [",".join(header)] + [",".join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return [f"{path}:{k}" for k in range(2, len(lines) + 1)]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    base = tmp_path_factory.mktemp("manifest_src")
    return base, _media(base)


def test_broken_csv_rows_are_all_named_and_nothing_is_written(source, tmp_path: Path, capsys) -> None:
    base, rows = source
    (base / "photos" / "broken.png").write_bytes(b"\x89PNG not really")
    (base / "speech" / "broken.wav").write_bytes(b"RIFF nor this")
    good = [[r["image"], r["audio"], r["text"], ""] for r in rows[:4]]
    bad = [
        (["photos/absent.jpg", "", "a photo that is not there", ""], "image file"),
        (["photos/broken.png", "", "an image that does not decode", ""], "cannot be decoded"),
        (["", "speech/broken.wav", "audio that does not decode", ""], "cannot be decoded"),
        (["", "", "", ""], "no image, audio or text"),
        (["photos/p0.jpg", "", "a caption then a cell too many", "", "extra"], "more cells"),
        ([rows[0]["image"], "", "a row with a taken id", "row_1"], "used again"),
    ]
    where = _csv(base / "broken.csv", ["image", "audio", "text", "id"], good + [row for row, _ in bad])
    out = tmp_path / "out"
    with pytest.raises(ImportProblems) as info:
        import_manifest(out, base / "broken.csv")
    found = [str(p) for p in info.value.problems]
    for line, (_, part) in zip(where[4:], bad, strict=True):
        assert any(p.startswith(f"{line}: ") and part in p for p in found), (line, part, found)
    assert len(found) == len(bad) and not out.exists()
    from cman.cli import main

    assert main(["data", "import-manifest", str(out), str(base / "broken.csv")]) == 1
    printed = capsys.readouterr()
    assert all(line in printed.out for line in where[4:]) and len(printed.err.strip().splitlines()) == 1
    assert main(["data", "import-manifest", str(out), str(base / "broken.csv"), "--skip-bad"]) == 0
    assert sum(len(json.loads(p.read_text())) for p in (out / "metadata").glob("*.json")) == 4


def test_broken_jsonl_lines_and_split_conflicts(source, tmp_path: Path) -> None:
    base, rows = source
    lines = [json.dumps({**rows[0], "split": "train"}), json.dumps({**rows[1], "split": "train"})]
    bad = [
        ("{not json", "not valid JSON"),
        ('["a list"]', "not a JSON object"),
        (json.dumps({"caption": "a caption in the wrong key"}), "a caption goes in `text`"),
        (json.dumps({"text": ["a", "list"], "split": "train"}), "text must be a string"),
        (json.dumps({"text": "a caption", "split": "dev"}), "is not one of train, val, test"),
        (json.dumps({**rows[1], "split": "test"}), "a group stays in one split"),  # p0's photo is in train
        (json.dumps({"text": "no split here"}), "no split, while other rows have one"),
    ]
    (base / "broken.jsonl").write_text("\n".join(lines + [line for line, _ in bad]) + "\n")
    with pytest.raises(ImportProblems) as info:
        import_manifest(tmp_path / "out", base / "broken.jsonl")
    found = [str(p) for p in info.value.problems]
    for number, (_, part) in enumerate(bad, start=3):
        assert any(p.startswith(f"{base / 'broken.jsonl'}:{number}: ") and part in p for p in found), (number, found)
    assert not (tmp_path / "out").exists()


def test_unknown_columns_and_files_are_one_clear_error(source, tmp_path: Path) -> None:
    base, _ = source
    _csv(base / "typo.csv", ["imgae", "text"], [["photos/p0.jpg", "a kite"]])
    with pytest.raises(ImportProblems, match=r"typo.csv:1: unknown column\(s\) \['imgae'\]"):
        import_manifest(tmp_path / "out", base / "typo.csv", skip_bad=True)
    with pytest.raises(ValueError, match="use a .csv file"):
        import_manifest(tmp_path / "out", base / "photos" / "p0.jpg")


@pytest.fixture(scope="module")
def imported(source, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base, rows = source
    header = ["image", "audio", "text", "speaker"]
    _csv(base / "manifest.csv", header, [[r[k] for k in header] for r in rows])
    out = tmp_path_factory.mktemp("manifest_out") / "data"
    assert import_manifest(out, base / "manifest.csv", seed=3) == {"train": 8, "val": 2, "test": 2}
    return out


def test_groups_split_together_and_media_copied_unchanged(source, imported: Path) -> None:
    base, _ = source
    seen: dict[str, str] = {}
    for split in ("train", "val", "test"):
        for entry in json.loads((imported / "metadata" / f"{split}_metadata.json").read_text()):
            assert seen.setdefault(entry["group"], split) == split  # a photo's captions stay in one split
            assert entry["group"] == entry["image_filename"] and entry["id"].startswith("row_")
            copied = imported / "images" / split / entry["image_filename"]
            assert copied.read_bytes() == (base / entry["image_filename"]).read_bytes()
            assert (imported / "audio" / split / entry["audio_filename"]).is_file() and entry["speaker"] in ("s0", "s1")
    assert len(seen) == 6
    again = imported.parent / "again"
    import_manifest(again, base / "manifest.csv", seed=4)
    import_manifest(again, base / "manifest.csv", seed=3)  # replaces the dataset it wrote before, whole
    assert (again / "metadata" / "test_metadata.json").read_text() == (
        imported / "metadata" / "test_metadata.json"
    ).read_text()  # seeded
    files = {d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()) for d in (again, imported)}
    assert files[again] == files[imported]  # nothing of the seed-4 import is left


def test_imported_manifest_validates_trains_and_indexes(imported: Path, tmp_path: Path) -> None:
    counts = validate_train_index(imported, tmp_path)
    assert counts == {"text": 2, "audio": 2, "image": 1}

"""`cman data import-flickr8k-audio` on a fixture in the public Flickr8k + Flickr Audio Caption Corpus layouts: every
broken line is named and nothing is written; the good fixture imports, validates, trains a few steps and indexes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from media_files import photo, validate_train_index, wav

from cman.data.flickr8k import import_flickr8k_audio
from cman.data.importing import ImportProblems

PHOTOS = {  # photo -> split list it is in
    "1000268201_693b08cb0e.jpg": "train",
    "1001773457_577c3a7d70.jpg": "train",
    "1002674143_1b742ab4b8.jpg": "train",
    "1003163366_44323f5815.jpg": "dev",
    "1007129816_e794419615.jpg": "test",
}
UNLISTED = "2258277193_586949ec62.jpg.1"  # as in the real token file: captioned, in no split list, no spoken captions
WORDS = ["a dog", "two children", "a man", "a girl in pink", "a black cat"]
PLACES = ["on the grass", "in the water", "near a wall", "on a bench", "in the snow"]


@dataclass
class Fixture:
    root: Path
    lines: dict[str, list[str]] = field(default_factory=dict)  # file name -> its lines

    def add(self, name: str, line: str) -> str:
        """Append a line to `name`; returns its `file:line` as the importer names it."""
        self.lines.setdefault(name, []).append(line)
        return f"{self.path(name)}:{len(self.lines[name])}"

    def path(self, name: str) -> Path:
        folder = "flickr_audio" if name.startswith("wav2") else "Flickr8k_text"
        return self.root / folder / name

    def write(self) -> None:
        for name, lines in self.lines.items():
            self.path(name).parent.mkdir(parents=True, exist_ok=True)
            self.path(name).write_text("\n".join(lines) + "\n")

    def args(self, out: Path) -> dict:
        return {
            "out_dir": out,
            "images": self.root / "Flicker8k_Dataset",
            "captions": self.path("Flickr8k.token.txt"),
            "audio": self.root / "flickr_audio",  # its wavs/ inside, as downloaded
            "wav2capt": self.path("wav2capt.txt"),
            "wav2spk": self.path("wav2spk.txt"),
            "splits": self.root / "Flickr8k_text",
        }


def make_fixture(root: Path, broken: bool) -> tuple[Fixture, list[tuple[str, str]]]:
    """The good fixture (5 photos x 5 captions, spoken), plus with `broken` one broken line of each kind; returns the
    fixture and the (file:line, message part) of every problem the importer must name."""
    fx, expected = Fixture(root), []
    split_file = {
        "train": "Flickr_8k.trainImages.txt",
        "dev": "Flickr_8k.devImages.txt",
        "test": "Flickr_8k.testImages.txt",
    }
    for i, (name, split) in enumerate(PHOTOS.items()):
        photo(root / "Flicker8k_Dataset" / name, seed=i)
        fx.add(split_file[split], name)
        for n in range(5):
            fx.add("Flickr8k.token.txt", f"{name}#{n}\t{WORDS[i]} {PLACES[n]} .")
            if broken and (i, n) in ((2, 4), (3, 4), (4, 4)):
                continue  # caption #4 of photos 2-4: a missing wav, an undecodable wav, no spoken caption at all
            stem = f"{Path(name).stem}_{n}"
            wav(root / "flickr_audio" / "wavs" / f"{stem}.wav", seed=10 * i + n)
            fx.add("wav2capt.txt", f"{stem}.wav {name} #{n}")
            fx.add("wav2spk.txt", f"{stem}.wav {i % 2 + 1}")
    fx.add("Flickr8k.token.txt", f"{UNLISTED}#0\tan image of the real token file that is in no split list")
    for split in ("train", "dev", "test"):
        fx.lines.setdefault(split_file[split], [])
    if broken:
        expected = _break(fx, root, split_file)
    fx.write()
    return fx, expected


def _break(fx: Fixture, root: Path, split_file: dict[str, str]) -> list[tuple[str, str]]:
    p = list(PHOTOS)
    stem = [Path(name).stem for name in p]
    wavs = root / "flickr_audio" / "wavs"
    expected = [
        (fx.add("Flickr8k.token.txt", "this line has neither a caption number nor a tab"), "bad line"),
        (fx.add("Flickr8k.token.txt", f"{p[0]}#0\tthe same caption number again"), "given twice"),
        (fx.add("wav2capt.txt", "only_a_wav.wav"), "bad line"),
        (fx.add("wav2capt.txt", f"{stem[0]}_0.wav {p[0]} #0"), "is listed again"),
        (fx.add("wav2spk.txt", "only_a_wav.wav"), "bad line"),
    ]
    wav(wavs / f"{stem[0]}_9.wav", seed=99)
    expected.append((fx.add("wav2capt.txt", f"{stem[0]}_9.wav {p[0]} #9"), "caption #9 of"))  # index out of range
    expected.append((fx.add("wav2capt.txt", f"missing.wav {p[2]} #4"), "not found"))  # a wav not on disk
    (wavs / "garbled.wav").write_bytes(b"RIFF this is no audio at all")
    expected.append((fx.add("wav2capt.txt", f"garbled.wav {p[3]} #4"), "cannot be decoded"))
    photo(root / "Flicker8k_Dataset" / "3000000000_nosplit00.jpg", seed=50)
    fx.add("Flickr8k.token.txt", "3000000000_nosplit00.jpg#0\ta photo that is in no split list")
    wav(wavs / "3000000000_nosplit00_0.wav", seed=51)
    expected.append((fx.add("wav2capt.txt", "3000000000_nosplit00_0.wav 3000000000_nosplit00.jpg #0"), "no split list"))
    wav(wavs / "orphan_0.wav", seed=52)
    expected.append((fx.add("wav2capt.txt", "orphan_0.wav 5000000000_nocaption.jpg #0"), "has no captions"))
    expected.append((fx.add(split_file["test"], "4000000000_missing00.jpg"), "not found"))  # a listed photo not on disk
    token_line = 5 * 4 + 5  # caption #4 of photo 4 (1-based line 25) has no spoken caption
    expected.append((f"{fx.path('Flickr8k.token.txt')}:{token_line}", "has no spoken caption"))
    return expected


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    return make_fixture(tmp_path_factory.mktemp("flickr8k_good"), broken=False)[0]


def _metadata(root: Path, split: str) -> list[dict]:
    return json.loads((root / "metadata" / f"{split}_metadata.json").read_text())


def test_every_broken_line_is_named_and_nothing_is_written(tmp_path: Path, capsys) -> None:
    fx, expected = make_fixture(tmp_path / "src", broken=True)
    out = tmp_path / "out"
    with pytest.raises(ImportProblems) as info:
        import_flickr8k_audio(**fx.args(out))
    found = [str(p) for p in info.value.problems]
    for where, part in expected:
        assert any(p.startswith(f"{where}: ") and part in p for p in found), (where, part, found)
    assert not any(UNLISTED in p for p in found), found  # captioned, unlisted, unspoken: left out, not a problem
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no staging left behind
    from cman.cli import main

    argv = [f"--{k}={v}" for k, v in fx.args(out).items() if k != "out_dir"]
    assert main(["data", "import-flickr8k-audio", str(out), *argv]) == 1
    printed = capsys.readouterr()
    assert all(where in printed.out for where, _ in expected) and not out.exists()
    assert len(printed.err.strip().splitlines()) == 1 and "nothing was written" in printed.err
    # --skip-bad: what each problem touches is left out, the rest imported
    assert main(["data", "import-flickr8k-audio", str(out), *argv, "--skip-bad"]) == 0
    counts = {split: len(_metadata(out, split)) for split in ("train", "val", "test")}
    assert counts == {"train": 13, "val": 4, "test": 4}, counts


def test_a_missing_input_file_stops_even_with_skip_bad(good: Fixture, tmp_path: Path) -> None:
    args = {**good.args(tmp_path / "out"), "wav2spk": tmp_path / "nope.txt"}
    with pytest.raises(ImportProblems, match="nope.txt: file not found"):
        import_flickr8k_audio(**args, skip_bad=True)


def test_a_foreign_output_directory_is_refused_before_any_work(good: Fixture, tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to replace"):
        import_flickr8k_audio(**good.args(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.fixture(scope="module")
def imported(good: Fixture, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("flickr8k_out") / "data"
    assert import_flickr8k_audio(**good.args(out)) == {"train": 15, "val": 5, "test": 5}
    return out


def test_items_are_captions_with_their_photo_speech_and_speaker(imported: Path) -> None:
    entries = _metadata(imported, "train")
    first = entries[0]
    assert first == {
        "id": "1000268201_693b08cb0e_0",
        "caption": "a dog on the grass .",
        "audio_filename": "1000268201_693b08cb0e_0.wav",
        "image_filename": "1000268201_693b08cb0e.jpg",
        "group": "1000268201_693b08cb0e",
        "speaker": "1",
    }
    assert [e["group"] for e in _metadata(imported, "val")] == ["1003163366_44323f5815"] * 5  # dev list -> val
    for split in ("train", "val", "test"):
        for entry in _metadata(imported, split):
            assert (imported / "images" / split / entry["image_filename"]).is_file()
            assert (imported / "audio" / split / entry["audio_filename"]).is_file()
    info = json.loads((imported / "dataset.json").read_text())
    assert info["generator"] == "cman.data.flickr8k" and info["counts"]["train"] == 15


def test_imported_data_validates_trains_and_indexes(imported: Path, tmp_path: Path) -> None:
    from cman import Gallery

    counts = validate_train_index(imported, tmp_path)
    assert counts == {"text": 5, "audio": 5, "image": 1}  # the test photo once, its 5 captions and 5 spoken ones
    gallery = Gallery.load(tmp_path / "index")
    assert gallery.get("1007129816_e794419615_3")["caption"] == "a black cat on a bench ."

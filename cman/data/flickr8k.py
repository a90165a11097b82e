"""Flickr8k photos + captions and the Flickr Audio Caption Corpus (FACC) spoken captions → the seed layout.

Inputs, in their public layouts:

- ``Flickr8k.token.txt``: ``<image>#<n><TAB><caption>``, 5 captions (#0-#4) per photo;
- the photos (``Flicker8k_Dataset/`` of the Flickr8k download, or any folder holding them);
- FACC ``wav2capt.txt``: ``<wav> <image> #<n>``, one spoken caption per caption, and its ``wavs/`` folder;
- optionally FACC ``wav2spk.txt``: ``<wav> <speaker id>``;
- the split lists ``Flickr_8k.{train,dev,test}Images.txt`` (one image per line; dev → val).

Every caption of a listed photo becomes one item (id ``<image stem>_<n>``) with its photo, its spoken caption and
``group`` = the photo, so the 5 captions of a photo are relevant to each other. Photos in no split list are left out
unless they have spoken captions (then that is a problem: they would be lost). Every problem is listed with its
``file:line``; by default any problem stops the import before anything is written.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cman.data.importing import (
    Problems,
    audio_problem,
    check_output_dir,
    image_problem,
    media_dir,
    read_lines,
    write_dataset,
)

logger = logging.getLogger(__name__)

SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
_CAPTION = re.compile(r"^(?P<image>\S+?)#(?P<n>\d+)\s+(?P<caption>\S.*)$")
_WAV2CAPT = re.compile(r"^(?P<wav>\S+)\s+(?P<image>\S+)\s+#(?P<n>\d+)$")
_WAV2SPK = re.compile(r"^(?P<wav>\S+)\s+(?P<speaker>\S+)$")


@dataclass
class Spoken:
    wav: str
    speaker: str | None
    where: str


@dataclass
class Flickr8k:
    """What the input files say, as read (problems aside)."""

    captions: dict[str, dict[int, tuple[str, str]]] = field(default_factory=dict)  # image -> n -> (caption, where)
    splits: dict[str, tuple[str, str]] = field(default_factory=dict)  # image -> (split, where)
    spoken: dict[tuple[str, int], Spoken] = field(default_factory=dict)  # (image, n) -> its spoken caption


def read_captions(path: Path, data: Flickr8k, problems: Problems) -> None:
    for number, line in read_lines(path, problems):
        where = f"{path}:{number}"
        match = _CAPTION.match(line)
        if match is None:
            problems.add(where, f"bad line {line[:80]!r}: expected IMAGE#N<TAB>CAPTION", drop=where)
            continue
        image, n = match["image"], int(match["n"])
        earlier = data.captions.setdefault(image, {}).get(n)
        if earlier is not None:
            problems.add(where, f"caption #{n} of {image} is given twice (first at {earlier[1]})", drop=(image, n))
            continue
        data.captions[image][n] = (match["caption"].strip(), where)


def read_splits(folder: Path, data: Flickr8k, problems: Problems) -> None:
    for split, name in SPLIT_FILES.items():
        path = folder / name
        for number, line in read_lines(path, problems):
            where = f"{path}:{number}"
            if len(line.split()) != 1:
                problems.add(where, f"bad line {line[:80]!r}: expected one image file name", drop=where)
                continue
            earlier = data.splits.get(line)
            if earlier is not None:
                problems.add(where, f"image {line} is listed again (first at {earlier[1]})", drop=line)
                continue
            data.splits[line] = (split, where)


def read_speakers(path: Path | None, problems: Problems) -> dict[str, str]:
    speakers: dict[str, tuple[str, str]] = {}
    for number, line in read_lines(path, problems) if path is not None else ():
        where = f"{path}:{number}"
        match = _WAV2SPK.match(line)
        if match is None:
            problems.add(where, f"bad line {line[:80]!r}: expected WAV SPEAKER", drop=where)
        elif match["wav"] in speakers and speakers[match["wav"]][0] != match["speaker"]:
            problems.add(where, f"{match['wav']} has another speaker at {speakers[match['wav']][1]}", drop=where)
        else:
            speakers.setdefault(match["wav"], (match["speaker"], where))
    return {wav: speaker for wav, (speaker, _) in speakers.items()}


def read_wav2capt(path: Path, audio: Path, speakers: dict[str, str], data: Flickr8k, problems: Problems) -> None:
    wavs: dict[str, str] = {}
    for number, line in read_lines(path, problems):
        where = f"{path}:{number}"
        match = _WAV2CAPT.match(line)
        if match is None:
            problems.add(where, f"bad line {line[:80]!r}: expected WAV IMAGE #N", drop=where)
            continue
        wav, image, n = match["wav"], match["image"], int(match["n"])
        key = (image, n)
        if wav in wavs:
            problems.add(where, f"{wav} is listed again (first at {wavs[wav]})", drop=where)
            continue
        wavs[wav] = where
        if key in data.spoken:
            message = f"caption #{n} of {image} already has a spoken caption ({data.spoken[key].where})"
            problems.add(where, message, drop=where)
            continue
        data.spoken[key] = Spoken(wav, speakers.get(wav), where)
        _check_spoken(data, key, where, audio / wav, problems)


def _check_spoken(data: Flickr8k, key: tuple[str, int], where: str, wav: Path, problems: Problems) -> None:
    image, n = key
    if image not in data.captions:
        problems.add(where, f"image {image} has no captions in the captions file", drop=key)
    elif n not in data.captions[image]:
        have = ", ".join(f"#{k}" for k in sorted(data.captions[image]))
        problems.add(where, f"caption #{n} of {image} is not in the captions file (it has {have})", drop=key)
    if image not in data.splits:
        problems.add(where, f"image {image} is in no split list ({', '.join(SPLIT_FILES.values())})", drop=image)
    bad = audio_problem(wav)
    if bad is not None:
        problems.add(where, bad, drop=key)


def check_photos(data: Flickr8k, images: Path, problems: Problems) -> None:
    """Every listed photo: its file decodes, it has captions, each caption has a spoken caption."""
    for image, (_, where) in data.splits.items():  # in the order of the split lists
        bad = image_problem(images / image)
        if bad is not None:
            problems.add(where, bad, drop=image)
        if image not in data.captions:
            problems.add(where, f"image {image} has no captions in the captions file", drop=image)
            continue
        for n, (_, caption_where) in sorted(data.captions[image].items()):
            if (image, n) not in data.spoken:
                message = f"caption #{n} of {image} has no spoken caption in wav2capt"
                problems.add(caption_where, message, drop=(image, n))


def plan_entries(data: Flickr8k, images: Path, audio: Path, dropped: set) -> tuple[dict[str, list], list]:
    """Metadata entries per split and the (source, relative destination) files to copy."""
    entries: dict[str, list[dict[str, Any]]] = {}
    copies: list[tuple[Path, Path]] = []
    for image in sorted(data.splits):
        split = data.splits[image][0]
        if image in dropped or image not in data.captions:
            continue
        kept = [n for n in sorted(data.captions[image]) if (image, n) not in dropped and (image, n) in data.spoken]
        if kept:
            copies.append((images / image, Path("images", split, image)))
        for n in kept:
            spoken = data.spoken[(image, n)]
            entry = {
                "id": f"{Path(image).stem}_{n}",
                "caption": data.captions[image][n][0],
                "audio_filename": spoken.wav,
                "image_filename": image,
                "group": Path(image).stem,
            }
            if spoken.speaker is not None:
                entry["speaker"] = spoken.speaker
            entries.setdefault(split, []).append(entry)
            copies.append((audio / spoken.wav, Path("audio", split, spoken.wav)))
    return entries, copies


def import_flickr8k_audio(
    out_dir: str | Path,
    images: str | Path,
    captions: str | Path,
    audio: str | Path,
    wav2capt: str | Path,
    splits: str | Path,
    wav2spk: str | Path | None = None,
    skip_bad: bool = False,
) -> dict[str, int]:
    """Import Flickr8k + FACC into `out_dir` (seed layout); returns the items per split.

    Raises ImportProblems listing every problem (nothing written), unless `skip_bad`: then what each problem touches
    (a caption, or a whole photo) is left out and logged; problems that cannot be skipped (a missing input file)
    still stop the import.
    """
    out = Path(out_dir).absolute()
    check_output_dir(out)  # a foreign directory is refused before the (long) checks
    images_dir = media_dir(images, ("Flicker8k_Dataset", "Flickr8k_Dataset"), "images")
    audio_dir = media_dir(audio, ("wavs",), "audio")
    problems, data = Problems(), Flickr8k()
    read_captions(Path(captions), data, problems)
    read_splits(Path(splits), data, problems)
    speakers = read_speakers(Path(wav2spk) if wav2spk is not None else None, problems)
    read_wav2capt(Path(wav2capt), audio_dir, speakers, data, problems)
    check_photos(data, images_dir, problems)
    problems.settle(out, skip_bad)
    entries, copies = plan_entries(data, images_dir, audio_dir, problems.dropped)
    if not entries:
        raise ValueError(f"no item to import: no caption of a listed photo has a spoken caption; {out} not written")
    unlisted = sum(1 for image in data.captions if image not in data.splits)
    if unlisted:
        logger.info("%d captioned images are in no split list and without spoken captions: left out", unlisted)
    info = {
        "generator": "cman.data.flickr8k",
        "images": "Flickr8k photos (Flickr licences; research use), copied unchanged",
        "captions": "Flickr8k captions, 5 per photo, one item each; group = the photo",
        "speech": "Flickr Audio Caption Corpus: spoken captions, copied unchanged; speaker from wav2spk.txt",
        "splits": "Flickr_8k.trainImages / devImages / testImages -> train / val / test",
        "skipped_problems": len(problems) if skip_bad else 0,
    }
    return write_dataset(out, entries, info, copies)

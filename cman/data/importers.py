"""Importers that turn real data into the seed layout (see ARCHITECTURE.md, "Dataset on disk").

- `import_digits`: FSDD spoken digits + scikit-learn handwritten digits + number words (all real).
- `import_coco`: COCO photos with their 5 real captions each; spoken captions synthesized by espeak-ng.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image

from cman.data.demo import (
    SPLITS,
    prepare_output_dir,
    write_dataset_info,
    write_split_metadata,
    write_wav_16k,
)
from cman.data.tts import VOICES, synthesize

logger = logging.getLogger(__name__)

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_IMAGE_SIZE = 32
COCO_RATE_RANGE = (150, 190)
COCO_PITCH_RANGE = (30, 70)


# --- FSDD + load_digits ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Recording:
    digit: int
    speaker: str
    take: int
    path: Path

    @property
    def item_id(self) -> str:
        return f"fsdd_{self.digit}_{self.speaker}_{self.take}"


def _find_recordings(fsdd_dir: str | Path) -> list[Recording]:
    root = Path(fsdd_dir)
    rec_dir = root / "recordings" if (root / "recordings").is_dir() else root
    if not rec_dir.is_dir():
        raise ValueError(f"FSDD directory {root} not found; pass the folder holding recordings/*.wav")
    recordings = []
    for path in sorted(rec_dir.glob("*.wav")):
        parts = path.stem.split("_")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[2].isdigit():
            logger.warning("skipping %s: not named {digit}_{speaker}_{take}.wav", path)
            continue
        recordings.append(Recording(int(parts[0]), parts[1], int(parts[2]), path))
    if not recordings:
        raise ValueError(f"no FSDD recordings ({{digit}}_{{speaker}}_{{take}}.wav) found in {rec_dir}")
    return recordings


def _speaker_splits(speakers: set[str], test_speakers: Sequence[str], val_speakers: Sequence[str]) -> dict[str, str]:
    test_speakers = (test_speakers,) if isinstance(test_speakers, str) else tuple(test_speakers)
    val_speakers = (val_speakers,) if isinstance(val_speakers, str) else tuple(val_speakers)
    for role, names in (("test_speakers", test_speakers), ("val_speakers", val_speakers)):
        unknown = sorted(set(names) - speakers)
        if unknown:
            raise ValueError(f"{role}: unknown speaker(s) {unknown}; the recordings have {sorted(speakers)}")
    overlap = sorted(set(test_speakers) & set(val_speakers))
    if overlap:
        raise ValueError(f"speaker(s) {overlap} are in both test_speakers and val_speakers; pick one split each")
    if not speakers - set(test_speakers) - set(val_speakers):
        raise ValueError("no speaker left for training; hold out fewer test/val speakers")
    return {s: "test" if s in test_speakers else "val" if s in val_speakers else "train" for s in speakers}


def _digit_image_pools(
    labels: np.ndarray, split_share: dict[int, dict[str, int]], rng: np.random.Generator
) -> dict[tuple[int, str], list[int]]:
    """Split the image indices of each digit into disjoint train/val/test pools, sized like the audio."""
    pools: dict[tuple[int, str], list[int]] = {}
    for digit in range(10):
        indices = [int(i) for i in rng.permutation(np.flatnonzero(labels == digit))]
        shares = split_share.get(digit, {})
        total = sum(shares.values())
        active = [s for s in SPLITS if shares.get(s)]
        start = 0
        for k, split in enumerate(active):
            if k == len(active) - 1:
                take = len(indices) - start
            else:
                take = max(1, round(len(indices) * shares[split] / total))
            pools[(digit, split)] = indices[start : start + take]
            start += take
    return pools


def _digit_png(pixels: np.ndarray, path: Path) -> None:
    """8x8 values 0-16 (ink high) → dark ink on white, upscaled, RGB PNG."""
    gray = (255 - pixels.reshape(8, 8) * (255 / 16)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(gray, "L").resize((DIGIT_IMAGE_SIZE, DIGIT_IMAGE_SIZE), Image.Resampling.BILINEAR)
    image.convert("RGB").save(path, format="PNG")


def import_digits(
    fsdd_dir: str | Path,
    out_dir: str | Path,
    test_speakers: Sequence[str] = ("theo",),
    val_speakers: Sequence[str] = ("george",),
    seed: int = 0,
    limit_per_speaker_digit: int | None = None,
) -> dict[str, int]:
    """Build a real tri-modal digits dataset: FSDD audio, sklearn handwritten images, number words.

    Every recording is one item, split by speaker, paired with a handwritten image of its digit
    from an image pool that is disjoint between splits. `limit_per_speaker_digit` keeps only the
    first N takes of each (speaker, digit), for quick runs. Returns the number of items per split.
    """
    from sklearn.datasets import load_digits

    recordings = _find_recordings(fsdd_dir)
    speaker_split = _speaker_splits({r.speaker for r in recordings}, test_speakers, val_speakers)
    if limit_per_speaker_digit is not None:
        recordings = [r for r in recordings if r.take < limit_per_speaker_digit]
    digits = load_digits()
    rng = np.random.default_rng(seed)
    split_share: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for rec in recordings:
        split_share[rec.digit][speaker_split[rec.speaker]] += 1
    pools = _digit_image_pools(digits.target, split_share, rng)

    out = prepare_output_dir(out_dir)
    write_dataset_info(out, _digits_info(seed, test_speakers, val_speakers, limit_per_speaker_digit))
    entries: dict[str, list[dict[str, str]]] = {split: [] for split in SPLITS}
    used: dict[tuple[int, str], int] = defaultdict(int)
    for rec in sorted(recordings, key=lambda r: (r.digit, r.speaker, r.take)):
        split = speaker_split[rec.speaker]
        pool = pools[(rec.digit, split)]
        image_index = pool[used[(rec.digit, split)] % len(pool)]  # cycle through the split's pool
        used[(rec.digit, split)] += 1
        image_name = f"digit_{image_index:04d}.png"
        image_path = out / "images" / split / image_name
        if not image_path.exists():
            _digit_png(digits.images[image_index], image_path)
        wave, sr = sf.read(str(rec.path), dtype="float32", always_2d=True)
        write_wav_16k(out / "audio" / split / f"{rec.item_id}.wav", wave.mean(axis=1), sr)
        entries[split].append(
            {
                "id": rec.item_id,
                "caption": NUMBER_WORDS[rec.digit],
                "audio_filename": f"{rec.item_id}.wav",
                "image_filename": image_name,
                "group": str(rec.digit),
                "speaker": rec.speaker,
            }
        )
    for split in SPLITS:
        write_split_metadata(out, split, entries[split])
    counts = {split: len(entries[split]) for split in SPLITS}
    logger.info("digits dataset in %s: %s", out, counts)
    return counts


def _digits_info(
    seed: int, test_speakers: Sequence[str], val_speakers: Sequence[str], limit: int | None
) -> dict[str, Any]:
    return {
        "generator": "cman.data.importers.digits",
        "seed": seed,
        "test_speakers": list(test_speakers),
        "val_speakers": list(val_speakers),
        "limit_per_speaker_digit": limit,
        "audio": "Free Spoken Digit Dataset (CC BY-SA 4.0), resampled 8 kHz -> 16 kHz",
        "images": "scikit-learn load_digits (UCI optdigits), 8x8 upscaled to 32x32; train/val/test pools disjoint",
        "captions": "number words zero..nine",
        "group": "digit class",
    }


# --- COCO mini with synthetic speech --------------------------------------------------------------


@dataclass(frozen=True)
class CocoImage:
    image_id: int
    source: Path
    captions: tuple[str, ...]


def _read_coco(coco_dir: Path) -> dict[str, list[CocoImage]]:
    """Read captions_all.jsonl; return images by source split ("train2017", "val2017"), sorted by id."""
    index = coco_dir / "captions_all.jsonl"
    if not index.is_file():
        raise ValueError(f"COCO index {index} not found; pass the coco_mini folder holding captions_all.jsonl")
    by_split: dict[str, list[CocoImage]] = defaultdict(list)
    for line_no, line in enumerate(index.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image = CocoImage(int(row["image_id"]), coco_dir / row["file"], tuple(row["captions"]))
            split = str(row["split"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{index}:{line_no}: bad entry ({err}); expected split/file/image_id/captions") from err
        if not image.source.is_file():
            raise ValueError(f"{index}:{line_no}: image {image.source} is missing")
        by_split[split].append(image)
    return {split: sorted(images, key=lambda im: im.image_id) for split, images in by_split.items()}


def _coco_splits(
    by_source: dict[str, list[CocoImage]], rng: np.random.Generator, limit_images: int | None
) -> dict[str, list[CocoImage]]:
    """train2017 → train; val2017 shuffled and halved into val / test; then at most `limit_images` each."""
    val_pool = by_source.get("val2017", [])
    order = [val_pool[i] for i in rng.permutation(len(val_pool))]
    half = len(order) // 2
    splits = {
        "train": by_source.get("train2017", []),
        "val": sorted(order[:half], key=lambda im: im.image_id),
        "test": sorted(order[half:], key=lambda im: im.image_id),
    }
    if limit_images is not None:
        splits = {split: images[:limit_images] for split, images in splits.items()}
    return splits


def _speak_to_file(job: tuple[str, str, int, int, str]) -> float:
    """Pool worker: synthesize one caption and write it as 16 kHz WAV; return its duration."""
    text, voice, rate, pitch, path = job
    wave, sr = synthesize(text, voice=voice, rate=rate, pitch=pitch)
    return write_wav_16k(Path(path), wave, sr, peak=0.9)


_COCO_README = """# COCO mini with spoken captions (cman import-coco)

Images: COCO 2017 photos (each keeps its Flickr licence; see license ids in the source index); not for
redistribution. Captions: the 5 human COCO captions per image (CC BY 4.0); one item per caption,
`group` = the COCO image id. train2017 → train, val2017 split in halves → val / test (seed {seed}).

**The spoken captions are synthetic**: generated with espeak-ng (voices {voices}), not recorded
speech. Say so wherever results on this set are reported.
"""


def import_coco(
    coco_dir: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    voices: Sequence[str] = tuple(VOICES),
    limit_images: int | None = None,
    workers: int = 2,
) -> dict[str, int]:
    """Build a COCO dataset: 5 items (one per caption) per image, captions spoken by espeak-ng.

    `limit_images` keeps at most that many images per split (for quick runs); `workers` is the
    size of the process pool used for speech synthesis. Returns the number of items per split.
    """
    if not voices:
        raise ValueError("voices is empty; pass espeak-ng voice names such as cman.data.tts.VOICES")
    rng = np.random.default_rng(seed)
    splits = _coco_splits(_read_coco(Path(coco_dir)), rng, limit_images)
    out = prepare_output_dir(out_dir)
    write_dataset_info(out, _coco_info(seed, voices, limit_images))
    jobs: list[tuple[str, str, int, int, str]] = []
    for split in SPLITS:
        entries = []
        for image in splits[split]:
            image_name = f"{image.image_id:012d}{image.source.suffix.lower()}"
            shutil.copyfile(image.source, out / "images" / split / image_name)
            for k, caption in enumerate(image.captions):
                item_id = f"coco_{image.image_id}_{k}"
                entries.append(
                    {
                        "id": item_id,
                        "caption": caption.strip(),
                        "audio_filename": f"{item_id}.wav",
                        "image_filename": image_name,
                        "group": str(image.image_id),
                    }
                )
                voice = voices[int(rng.integers(len(voices)))]
                rate = int(rng.integers(COCO_RATE_RANGE[0], COCO_RATE_RANGE[1] + 1))
                pitch = int(rng.integers(COCO_PITCH_RANGE[0], COCO_PITCH_RANGE[1] + 1))
                jobs.append((caption.strip(), voice, rate, pitch, str(out / "audio" / split / f"{item_id}.wav")))
        write_split_metadata(out, split, entries)
    _run_tts_jobs(jobs, workers)
    (out / "README.md").write_text(_COCO_README.format(seed=seed, voices=", ".join(voices)))
    counts = {split: 5 * len(splits[split]) for split in SPLITS}
    logger.info("coco dataset in %s: %s (spoken captions synthetic)", out, counts)
    return counts


def _run_tts_jobs(jobs: list[tuple[str, str, int, int, str]], workers: int) -> None:
    if workers <= 1 or len(jobs) < 2 * workers:
        for job in jobs:
            _speak_to_file(job)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        for _ in pool.map(_speak_to_file, jobs, chunksize=16):
            pass


def _coco_info(seed: int, voices: Sequence[str], limit_images: int | None) -> dict[str, Any]:
    return {
        "generator": "cman.data.importers.coco",
        "seed": seed,
        "limit_images": limit_images,
        "images": "COCO 2017 (Flickr licences per image), copied unchanged",
        "captions": "COCO captions (CC BY 4.0), 5 per image, one item each",
        "speech": "synthetic (espeak-ng via espeakng-loader)",
        "voices": list(voices),
        "splits": "train2017 -> train; val2017 shuffled by seed and halved -> val / test",
        "group": "COCO image id",
    }

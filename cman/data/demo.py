"""Embedded offline demo dataset: rendered shape scenes, captions from a tiny grammar, spoken by espeak-ng.

Every caption names all four attributes of its image (size, colour, shape, position) and nothing
else, so items with the same attribute combination share a ``group`` and count as mutual hits.
The vocabulary is kept small on purpose: a tiny model trained for minutes on a CPU can learn it.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr
from PIL import Image, ImageDraw

from cman.data.layout import metadata_path
from cman.data.tts import VOICES, synthesize

logger = logging.getLogger(__name__)

GENERATOR = "cman.data.demo"
FORMAT_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "val", "test")
SAMPLE_RATE = 16_000
IMAGE_SIZE = 96
SIZE_PRESETS: dict[str, dict[str, int]] = {
    "small": {"train": 480, "val": 100, "test": 120},
    "medium": {"train": 1440, "val": 300, "test": 360},
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
}
SIZES: dict[str, float] = {"small": 11.0, "large": 22.0}  # shape radius in pixels
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.27, 0.5),
    "center": (0.5, 0.5),
    "right": (0.73, 0.5),
}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "center": "in the middle",
    "right": "on the right",
}
TEMPLATES: tuple[str, ...] = (
    "a {size} {color} {shape} {where}",
    "there is a {size} {color} {shape} {where}",
    "{where} a {size} {color} {shape}",
)
# `test_paraphrase`: the test split's images and audio, captions reworded with words and sentence shapes that never
# occur in training (nor in val/test): synonyms for every attribute and new sentence forms (passive, questions,
# fronted places). Only function words ("a", "the", "is", "in") are shared with TEMPLATES. A text encoder trained on the
# demo captions alone has never seen these words; a pretrained one knows that "crimson disc" is a "red circle".
PARAPHRASE_SPLIT = "test_paraphrase"
PARAPHRASE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("tiny", "little", "miniature"),
    "large": ("big", "huge", "giant"),
    "red": ("crimson", "scarlet"),
    "green": ("emerald", "lime"),
    "blue": ("navy", "azure"),
    "yellow": ("golden", "lemon"),
    "circle": ("ball", "disc", "round shape"),
    "square": ("box", "block"),
    "triangle": ("triangular shape", "three-sided shape"),
    "star": ("pentagram", "five-pointed shape"),
    "left": ("at the left-hand side", "in the left-hand half"),
    "center": ("at the centre", "in the central part"),
    "right": ("at the right-hand side", "in the right-hand half"),
}
PARAPHRASE_TEMPLATES: tuple[str, ...] = (
    "a {size} {color} {shape} is shown {where}",  # passive
    "can you find the {size} {color} {shape} {where}?",  # question
    "{where} sits one {size} {color} {shape}",  # fronted place
    "which picture has a {color} {shape} that is {size}, {where}?",  # question, postposed size
)
RATE_RANGE = (160, 200)  # words per minute
PITCH_RANGE = (25, 75)


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    position: str

    @property
    def group(self) -> str:
        return f"{self.size}-{self.color}-{self.shape}-{self.position}"


ALL_SCENES: tuple[Scene, ...] = tuple(
    Scene(shape, color, size, position)
    for size, color, shape, position in itertools.product(SIZES, COLORS, SHAPES, POSITIONS)
)


# --- output directory handling (shared with the importers) ----------------------------------------


def prepare_output_dir(out_dir: str | Path, extra_splits: tuple[str, ...] = ()) -> Path:
    """Make `out_dir` ready for a fresh dataset without ever touching foreign data.

    An empty or missing directory is fine; a directory holding a dataset written by one of
    CMAN's generators (it has a ``dataset.json`` naming one) has its previous items removed;
    anything else is refused with a ValueError.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()):
        info = _read_dataset_info(out)
        if info is None or not str(info.get("generator", "")).startswith("cman.data."):
            raise ValueError(
                f"refusing to write into non-empty directory {out}: it is not a dataset written "
                f"by cman ({out / 'dataset.json'} missing); choose an empty or new directory"
            )
        logger.info("replacing previous %s dataset in %s", info.get("generator"), out)
        _remove_previous_items(out)
    for split in (*SPLITS, *extra_splits):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "audio" / split).mkdir(parents=True, exist_ok=True)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    return out


def _read_dataset_info(out: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((out / "dataset.json").read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _remove_previous_items(out: Path) -> None:
    """Delete exactly the files that the previous metadata lists, then the metadata itself."""
    for split in (*SPLITS, PARAPHRASE_SPLIT):
        meta_path = metadata_path(out, split)
        try:
            entries = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        for entry in entries:
            for key, sub in (("image_filename", "images"), ("audio_filename", "audio")):
                name = entry.get(key)
                if name and Path(name).name == name:  # plain file names only, never ../
                    (out / sub / split / name).unlink(missing_ok=True)
        meta_path.unlink()


def write_split_metadata(out: Path, split: str, entries: list[dict[str, str]]) -> None:
    path = metadata_path(out, split)
    path.write_text(json.dumps(entries, indent=1) + "\n")


def write_dataset_info(out: Path, info: dict[str, Any]) -> None:
    (out / "dataset.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def write_wav_16k(path: Path, wave: np.ndarray, sample_rate: int, peak: float | None = None) -> float:
    """Resample `wave` to 16 kHz mono, optionally peak-normalise, write 16-bit PCM; return seconds."""
    if sample_rate != SAMPLE_RATE:
        wave = soxr.resample(wave.astype(np.float32), sample_rate, SAMPLE_RATE, quality="HQ")
    if peak is not None:
        wave = wave * (peak / max(float(np.abs(wave).max()), 1e-6))
    wave = np.clip(wave, -1.0, 1.0)
    sf.write(str(path), wave, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return len(wave) / SAMPLE_RATE


# --- scenes, captions and rendering ---------------------------------------------------------------


def caption_for(scene: Scene, template: int) -> str:
    """Describe `scene` with phrasing `template` (an index into TEMPLATES)."""
    return TEMPLATES[template].format(
        size=scene.size,
        color=scene.color,
        shape=scene.shape,
        where=POSITION_PHRASES[scene.position],
    )


def paraphrase_for(scene: Scene, rng: np.random.Generator) -> str:
    """A reworded caption of `scene`: a PARAPHRASE_TEMPLATES form filled with PARAPHRASE_WORDS synonyms."""

    def pick(word: str) -> str:
        options = PARAPHRASE_WORDS[word]
        return options[int(rng.integers(len(options)))]

    template = PARAPHRASE_TEMPLATES[int(rng.integers(len(PARAPHRASE_TEMPLATES)))]
    return template.format(
        size=pick(scene.size), color=pick(scene.color), shape=pick(scene.shape), where=pick(scene.position)
    )


def write_paraphrase_split(out: Path, test_entries: list[dict[str, str]], seed: int) -> int:
    """`test_paraphrase`: every test item's image and audio (hard-linked, copied if links fail), reworded caption."""
    import shutil

    rng = np.random.default_rng([seed, 99])
    entries = []
    for entry in test_entries:
        scene = Scene(*_scene_of(entry["group"]))
        for key, sub in (("image_filename", "images"), ("audio_filename", "audio")):
            src, dst = out / sub / "test" / entry[key], out / sub / PARAPHRASE_SPLIT / entry[key]
            dst.unlink(missing_ok=True)
            try:
                dst.hardlink_to(src)
            except OSError:
                shutil.copyfile(src, dst)
        entries.append({**entry, "id": f"{entry['id']}_p", "caption": paraphrase_for(scene, rng)})
    write_split_metadata(out, PARAPHRASE_SPLIT, entries)
    return len(entries)


def _scene_of(group: str) -> tuple[str, str, str, str]:
    size, color, shape, position = group.split("-")
    return shape, color, size, position


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners, radii, start = 4, [r * 0.95], math.pi / 4
    elif shape == "triangle":
        corners, radii, start = 3, [r * 1.1], -math.pi / 2
    elif shape == "star":
        corners, radii, start = 10, [r * 1.15, r * 0.5], -math.pi / 2
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    return [
        (
            cx + radii[k % len(radii)] * math.cos(start + angle + 2 * math.pi * k / corners),
            cy + radii[k % len(radii)] * math.sin(start + angle + 2 * math.pi * k / corners),
        )
        for k in range(corners)
    ]


def render_scene(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw `scene` on a lightly noisy grey background with small jitter in place, size, angle and hue."""
    background = rng.normal(225.0, 6.0, (size, size, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    fx, fy = POSITIONS[scene.position]
    cx = fx * size + rng.uniform(-4, 4)
    cy = fy * size + rng.uniform(-12, 12)
    r = SIZES[scene.size] * size / 96 * rng.uniform(0.9, 1.1)
    fill = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLORS[scene.color])
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_shape_points(scene.shape, cx, cy, r, rng.uniform(-0.2, 0.2)), fill=fill)
    return image


def _balanced_scenes(n: int, rng: np.random.Generator) -> list[Scene]:
    """`n` scenes covering every attribute combination as evenly as possible, in random order."""
    reps = math.ceil(n / len(ALL_SCENES))
    pool = [scene for _ in range(reps) for scene in rng.permutation(len(ALL_SCENES))]
    chosen = [ALL_SCENES[i] for i in pool[:n]]
    return [chosen[i] for i in rng.permutation(n)]


def _make_item(out: Path, split: str, item_id: str, scene: Scene, rng: np.random.Generator) -> dict[str, str]:
    caption = caption_for(scene, int(rng.integers(len(TEMPLATES))))
    voice = VOICES[int(rng.integers(len(VOICES)))]
    rate = int(rng.integers(RATE_RANGE[0], RATE_RANGE[1] + 1))
    pitch = int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1))
    render_scene(scene, rng).save(out / "images" / split / f"{item_id}.png", format="PNG")
    wave, sr = synthesize(caption, voice=voice, rate=rate, pitch=pitch)
    write_wav_16k(out / "audio" / split / f"{item_id}.wav", wave, sr, peak=0.9)
    return {
        "id": item_id,
        "caption": caption,
        "audio_filename": f"{item_id}.wav",
        "image_filename": f"{item_id}.png",
        "group": scene.group,
    }


def _resolve_counts(size: str, counts: dict[str, int] | None) -> dict[str, int]:
    if size not in SIZE_PRESETS:
        raise ValueError(f"unknown demo size {size!r}; choose one of {sorted(SIZE_PRESETS)}")
    resolved = dict(SIZE_PRESETS[size])
    for split, n in (counts or {}).items():
        if split not in SPLITS or not isinstance(n, int) or n < 0:
            raise ValueError(f"counts[{split!r}]={n!r}: use splits {SPLITS} with non-negative ints")
        resolved[split] = n
    return resolved


def _dataset_info(seed: int, size: str, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "generator": GENERATOR,
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "size": size,
        "counts": counts,
        "image_size": [IMAGE_SIZE, IMAGE_SIZE],
        "audio_sample_rate": SAMPLE_RATE,
        "speech": "synthetic (espeak-ng via espeakng-loader)",
        "attributes": {
            "shape": list(SHAPES),
            "color": list(COLORS),
            "size": list(SIZES),
            "position": list(POSITIONS),
        },
        "templates": list(TEMPLATES),
        "paraphrase": {
            "split": PARAPHRASE_SPLIT,
            "of": "test",
            "templates": list(PARAPHRASE_TEMPLATES),
            "words": {k: list(v) for k, v in PARAPHRASE_WORDS.items()},
        },
        "num_groups": len(ALL_SCENES),
        "voices": list(VOICES),
    }


_README = """# CMAN demo dataset

Generated offline by `cman demo-data` ({generator}, seed {seed}, size {size}): {total} items.
Images: {image_size}x{image_size} RGB renderings of one shape (size, colour, shape, position).
Captions: a small grammar that names all four attributes; `group` = the attribute combination.
Audio: the caption spoken by espeak-ng (synthetic speech; voice, rate and pitch vary per item),
16 kHz mono 16-bit WAV. See dataset.json for the vocabulary, templates and voices.
Split `test_paraphrase`: the test split's images and audio with reworded captions (synonyms and sentence forms that
never occur in training, listed under "paraphrase" in dataset.json): `cman eval --split test_paraphrase`.
"""


def generate_demo_dataset(
    out_dir: str | Path,
    seed: int = 0,
    size: str = "small",
    counts: dict[str, int] | None = None,
) -> dict[str, int]:
    """Write the demo dataset into `out_dir` in the seed layout; return the number of items per split.

    `counts` overrides the per-split sizes of the `size` preset (e.g. ``{"train": 20}``).
    The output depends only on `seed`, `size` and `counts`.
    """
    split_counts = _resolve_counts(size, counts)
    out = prepare_output_dir(out_dir, extra_splits=(PARAPHRASE_SPLIT,))
    write_dataset_info(out, _dataset_info(seed, size, split_counts))
    start = time.perf_counter()
    next_index = 0
    for split_no, split in enumerate(SPLITS):
        split_rng = np.random.default_rng([seed, split_no])
        scenes = _balanced_scenes(split_counts[split], split_rng)
        entries = []
        for scene in scenes:
            item_rng = np.random.default_rng([seed, split_no, next_index])
            entries.append(_make_item(out, split, f"demo_{next_index:05d}", scene, item_rng))
            next_index += 1
        write_split_metadata(out, split, entries)
    split_counts[PARAPHRASE_SPLIT] = write_paraphrase_split(out, entries, seed)  # `entries` = the test split
    total = sum(split_counts.values())
    (out / "README.md").write_text(
        _README.format(
            generator=GENERATOR,
            seed=seed,
            size=size,
            total=total,
            image_size=IMAGE_SIZE,
        )
    )
    logger.info("demo dataset: %d items in %s (%.1f s)", total, out, time.perf_counter() - start)
    return split_counts

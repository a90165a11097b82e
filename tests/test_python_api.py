"""The Python API (`from cman import CMAN, Gallery`): light import, `model.embed(text=, audio=, image=)` on every
input form, in-process gallery search, and the README's example, whose top hit must equal the HTTP service's."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from tiny import REPO


def test_import_cman_loads_no_heavy_library() -> None:
    code = (
        "import sys, cman\n"
        "assert not {'ray', 'mlflow', 'fastapi', 'torch'} & set(sys.modules), 'import cman'\n"
        "from cman import CMAN, Gallery\n"
        "assert not {'ray', 'mlflow', 'fastapi'} & set(sys.modules), sorted(sys.modules)\n"
        "assert CMAN.__name__ == 'CMAN' and Gallery.__name__ == 'Gallery'\n"
        "print(cman.__version__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == __import__("cman").__version__


@pytest.fixture(scope="module")
def model(trained_checkpoint: Path):
    from cman import CMAN

    return CMAN.from_pretrained(trained_checkpoint)


@pytest.fixture(scope="module")
def items(demo_root: Path):
    from cman.data.dataset import load_split

    return load_split(demo_root, "test")[:3]


def test_embed_every_input_form_gives_the_same_normalised_vector(model, items) -> None:
    item = items[0]
    wave, rate = sf.read(item.audio_path, dtype="float32")
    audio = [model.embed(audio=f) for f in (item.audio_path, Path(item.audio_path).read_bytes())]
    audio.append(model.embed(audio=wave, sample_rate=rate))
    image = [model.embed(image=f) for f in (item.image_path, Path(item.image_path).read_bytes())]
    image.append(model.embed(image=Image.open(item.image_path)))
    for group in (audio, image):
        assert group[0].shape == (512,) and abs(np.linalg.norm(group[0]) - 1) < 1e-5
        for other in group[1:]:
            np.testing.assert_allclose(other, group[0], atol=1e-5)
    # a waveform at another rate is resampled to the encoder's
    slow = model.embed(audio=np.repeat(wave, 2), sample_rate=2 * rate)
    assert float(slow @ audio[0]) > 0.99
    # batches: row i composes entry i of each list, and equals the single query
    captions = [i.caption for i in items]
    images = [i.image_path for i in items]
    batch = model.embed(text=captions, image=images)
    assert batch.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(batch[1], model.embed(text=captions[1], image=images[1]), atol=1e-5)
    assert not np.allclose(batch[0], model.embed(text=captions[0]), atol=1e-3)  # composition matters


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "at least one of text=, audio=, image="),
        ({"text": ["a", "b"], "image": ["x.png"]}, "one entry per query row"),
        ({"text": "a", "image": ["x.png"]}, "not a mix"),
        ({"audio": np.zeros(16000, dtype=np.float32)}, "sample_rate="),
        ({"image": "/nonexistent.png"}, "/nonexistent.png does not exist"),
        ({"text": "   "}, "empty"),
    ],
)
def test_embed_bad_input_is_a_clear_error(model, kwargs, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        model.embed(**kwargs)


def test_gallery_errors(tmp_path: Path) -> None:
    from cman import Gallery

    with pytest.raises(FileNotFoundError, match="not found"):
        Gallery.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="holds no gallery index"):
        Gallery.load(tmp_path)


def test_from_pretrained_names_a_bad_source(tmp_path: Path) -> None:
    from cman import CMAN

    with pytest.raises(FileNotFoundError, match="is not a CMAN checkpoint"):
        CMAN.from_pretrained(tmp_path)


def test_encode_methods_take_sentence_transformers_keywords(model, items) -> None:
    import torch

    from cman import Modality

    captions = [i.caption for i in items]
    one = model.encode_text(captions[0])
    assert one.shape == (512,) and abs(np.linalg.norm(one) - 1) < 1e-5
    np.testing.assert_allclose(one, model.embed(text=captions[0]), atol=1e-5)
    np.testing.assert_allclose(model.encode(captions[0]), one, atol=1e-6)  # sentence-transformers' name
    batch = model.encode_text(captions, batch_size=2, show_progress_bar=True, normalize_embeddings=False)
    assert batch.shape == (3, 512)
    np.testing.assert_allclose(batch[2], model.encode_text(captions[2]), atol=1e-5)
    images = model.encode_image([i.image_path for i in items], convert_to_tensor=True, device="cpu")
    assert isinstance(images, torch.Tensor) and images.shape == (3, 512)
    np.testing.assert_allclose(images[1].numpy(), model.embed(image=items[1].image_path), atol=1e-5)
    audio = model.encode_audio(Path(items[0].audio_path).read_bytes())
    np.testing.assert_allclose(audio, model.embed(audio=items[0].audio_path), atol=1e-5)
    assert model.encode_text([]).shape == (0, 512)
    with pytest.raises(TypeError, match="encode_tokens"):
        model.encode(Modality.TEXT, {"input_ids": None})


def test_gallery_build_add_remove_save_and_serve(model, items, tmp_path: Path) -> None:
    from cman import Gallery
    from serve_app.gallery_store import GalleryStore

    png = Path(items[1].image_path).read_bytes()
    gallery = Gallery.build(
        model,
        [
            {"id": "a", "text": items[0].caption, "image": items[0].image_path, "audio": items[0].audio_path},
            {"id": "b", "image": png},  # bytes: stored in the gallery store, as the service stores uploads
            {"id": "c", "text": items[2].caption, "image": Image.open(items[2].image_path)},
        ],
    )
    assert len(gallery) == 3 and sorted(gallery.targets) == ["audio", "image", "text"]
    hits = gallery.search(model.encode_image(png), "image", k=3)
    assert hits[0]["id"] == "b" and "image_path" not in hits[0] and gallery.media("b", "image") == png
    assert next(h for h in hits if h["id"] == "a")["image_path"] == str(Path(items[0].image_path).resolve())
    with pytest.raises(ValueError, match="already in the gallery"):
        gallery.add({"id": "a", "text": "another"})
    out = gallery.save(tmp_path / "index")
    store = GalleryStore(out, None, ["text", "audio", "image"], 512)  # what `cman serve --index` runs on
    try:
        assert store.counts() == {"text": 2, "audio": 1, "image": 3}
        assert store.media("b", "image")[1] == png and store.existing("b").record["image_path"].startswith("media/")
    finally:
        store.close()
    loaded = Gallery.load(out, model=model)
    assert (
        loaded.media("b", "image") == png and "image_path" not in loaded.search(model.encode_image(png), "image", 1)[0]
    )
    assert loaded.search(items[0].caption, "text", 1)[0]["id"] == "a"  # a text query, with the gallery's model
    assert loaded.remove("c") == 1 and loaded.add({"id": "d", "text": "a brand new caption"}) == ["d"]
    loaded.save()  # back to where it was loaded from: only the changes
    again = Gallery.load(out)
    assert sorted(again.ids) == ["a", "b", "d"] and again.get("d")["caption"] == "a brand new caption"
    copy = again.save(tmp_path / "copy")  # elsewhere: everything, stored media included
    assert Gallery.load(copy).media("b", "image") == png
    with pytest.raises(ValueError, match="already holds another gallery"):
        Gallery.build(model, [{"id": "z", "text": "one more"}]).save(out)


# ---- the README example against the HTTP service (runs with the Serve tests: it uses `served_app`) ----------------
def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API") :]
    start = section.index("```python") + len("```python")
    return section[start : section.index("\n```", start)]


def test_readme_example_matches_the_http_service(served_app: dict) -> None:
    code = readme_example()
    assert len(code.strip().splitlines()) <= 12, "the README's Python example should stay short"
    code = code.replace("outputs/quickstart/best", str(served_app["args"].checkpoint))
    code = code.replace("outputs/quickstart/index", str(served_app["index_dir"]))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the documented example, run as written
    printed = out.getvalue().splitlines()
    query = re.search(r'embed\(text="([^"]+)"\)', code).group(1)
    k = int(re.search(r"k=(\d+)", code).group(1))
    with httpx.Client(base_url=served_app["url"], timeout=120) as client:
        body = client.post("/search", data={"text": query, "target": "image", "k": str(k)}).json()
    http_ids = [r["id"] for r in body["results"]]
    assert printed[0].split()[0] == http_ids[0], (printed, body)
    # and the whole ranking with its scores, not only the top hit
    from cman import CMAN, Gallery

    gallery = Gallery.load(served_app["index_dir"])
    hits = gallery.search(CMAN.from_pretrained(served_app["args"].checkpoint).embed(text=query), "image", k)
    assert [h["id"] for h in hits] == http_ids
    np.testing.assert_allclose([h["score"] for h in hits], [r["score"] for r in body["results"]], atol=1e-5)

"""Ray Serve application end to end: a real `serve.run` on localhost, real HTTP through httpx.

The tiny checkpoint is trained for a few epochs only, so its embeddings of different items are close. Retrieval
tests therefore query with an item's own medium (its image for the image gallery, ...) and pick an item whose own
gallery vector is clearly nearer to itself than any other (computed from the saved index), so "the item comes first"
is deterministic and still fails if the served embedding differs from the indexed one.
"""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import SERVE_UPLOAD_MB as UPLOAD_MB
from conftest import run_serve_app

from cman.gallery_mirror import open_gallery
from cman.modality import Modality

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def app(served_app: dict):
    client = httpx.Client(base_url=served_app["url"], timeout=120)
    yield {**served_app, "client": client}
    client.close()


def distinct_item(index_dir: Path, modality: str) -> tuple[str, dict]:
    """An item whose vector is nearer to itself than to any other by a clear margin (no ties)."""
    index = open_gallery(index_dir)[Modality(modality)]
    vectors = index.vectors()  # (n, dim)
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    margins = 1.0 - sims.max(axis=1)
    best = int(np.argmax(margins))
    assert margins[best] > 1e-4, f"the tiny model collapsed: no {modality} item is distinct ({margins.max():.2e})"
    item_id = index.ids[best]
    return item_id, index.get(item_id)


def _wav_bytes(seconds: float = 0.5, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def _png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _search(client: httpx.Client, target: str, k: int = 5, text: str | None = None, files: dict | None = None):
    data = {"target": target, "k": str(k)}
    if text is not None:
        data["text"] = text
    return client.post("/search", data=data, files=files or {})


# ---- endpoints -------------------------------------------------------------------------------------------------------
def test_healthz_page_docs(app) -> None:
    client = app["client"]
    assert client.get("/healthz").json() == {"status": "ok"}
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/search" in page.text
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search", "/embed", "/items", "/items/{item_id}/image", "/items/{item_id}/audio"} <= set(paths)


@pytest.mark.parametrize("modality", ["image", "audio", "text"])
def test_item_finds_itself(app, modality: str) -> None:
    item_id, record = distinct_item(app["index_dir"], modality)
    if modality == "text":
        response = _search(app["client"], "text", text=record["caption"])
    else:
        path = Path(record[f"{modality}_path"])
        response = _search(app["client"], modality, files={modality: (path.name, path.read_bytes())})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query_modalities"] == [modality] and body["target"] == modality
    assert len(body["results"]) == 5
    top = body["results"][0]
    assert top["id"] == item_id and top["score"] > 0.999
    assert top["image_url"] == f"/items/{item_id}/image" and top["audio_url"] == f"/items/{item_id}/audio"
    assert top["caption"] == record["caption"]
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_composed_query_searches_the_fused_embedding(app) -> None:
    """text+image of one item: the search ranks the gallery by the composed embedding /embed returns."""
    client = app["client"]
    item_id, record = distinct_item(app["index_dir"], "image")
    image = Path(record["image_path"])
    files = {"image": (image.name, image.read_bytes(), "image/png")}
    response = _search(client, "image", k=4, text=record["caption"], files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query_modalities"] == ["text", "image"]
    emb = client.post("/embed", data={"text": record["caption"]}, files=files).json()
    assert emb["modalities"] == ["text", "image"] and len(emb["embedding"]) == 512
    vector = np.asarray(emb["embedding"], dtype=np.float32)
    assert abs(np.linalg.norm(vector) - 1) < 1e-4
    image_only = np.asarray(client.post("/embed", files=files).json()["embedding"], dtype=np.float32)
    assert not np.allclose(vector, image_only, atol=1e-4), "the caption did not change the composed embedding"
    expected = open_gallery(app["index_dir"])[Modality.IMAGE].search(vector[None], 4)[0]
    assert [r["id"] for r in body["results"]] == [item["id"] for item, _ in expected]
    assert np.allclose([r["score"] for r in body["results"]], [s for _, s in expected], atol=1e-4)


def test_media_endpoints(app) -> None:
    client = app["client"]
    _, record = distinct_item(app["index_dir"], "image")
    image = client.get(f"/items/{record['id']}/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content == Path(record["image_path"]).read_bytes()
    audio = client.get(f"/items/{record['id']}/audio")
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/wav"
    assert audio.content == Path(record["audio_path"]).read_bytes()


# ---- bad input -------------------------------------------------------------------------------------------------------
def _bad_cases(root: Path) -> list[tuple[str, str, dict, dict, int, str]]:
    """(name, path, form data, files, expected status, substring of the error)."""
    some_image = next((root / "images" / "test").glob("*.png")).read_bytes()
    big = b"\x89PNG" + b"\x00" * int(UPLOAD_MB * 1024 * 1024 + 10)
    tiny_wav = io.BytesIO()
    sf.write(tiny_wav, np.zeros(20, dtype=np.float32), 16000, format="WAV")
    img = {"image": ("x.png", some_image, "image/png")}
    return [
        ("empty query", "/search", {"target": "image"}, {}, 400, "empty query"),
        ("blank text", "/search", {"target": "image", "text": "   "}, {}, 400, "empty query"),
        ("unknown target", "/search", {"target": "video", "text": "a red star"}, {}, 422, "target"),
        ("missing target", "/search", {"text": "a red star"}, {}, 422, "target"),
        ("k=0", "/search", {"target": "image", "text": "a red star", "k": "0"}, {}, 422, "k must be"),
        ("k=101", "/search", {"target": "image", "text": "a red star", "k": "101"}, {}, 422, "k must be"),
        ("k=abc", "/search", {"target": "image", "text": "a red star", "k": "abc"}, {}, 422, "k"),
        (
            "bad audio",
            "/search",
            {"target": "image"},
            {"audio": ("a.wav", b"RIFFnonsense" * 10, "audio/wav")},
            415,
            "could not be decoded",
        ),
        (
            "too short audio",
            "/search",
            {"target": "image"},
            {"audio": ("a.wav", tiny_wav.getvalue(), "audio/wav")},
            415,
            "too short",
        ),
        ("empty audio file", "/search", {"target": "image"}, {"audio": ("a.wav", b"", "audio/wav")}, 400, "empty"),
        (
            "text as image",
            "/search",
            {"target": "image"},
            {"image": ("x.png", b"hello, not an image", "image/png")},
            415,
            "could not be decoded",
        ),
        ("png bomb", "/search", {"target": "image"}, {"image": ("bomb.png", _png_bomb(), "image/png")}, 413, "pixels"),
        ("oversized upload", "/search", {"target": "image"}, {"image": ("big.png", big, "image/png")}, 413, "limit"),
        (
            "huge body",
            "/search",
            {"target": "image"},
            {"image": ("big.png", big * 6, "image/png")},
            413,
            "request body",
        ),
        (
            "wrong part type",
            "/search",
            {"target": "image"},
            {"image": ("x.txt", some_image, "text/plain")},
            415,
            "content type",
        ),
        (
            "audio as image",
            "/search",
            {"target": "image"},
            {"image": ("x.wav", _wav_bytes(), "audio/wav")},
            415,
            "content type",
        ),
        ("text too long", "/search", {"target": "image", "text": "red " * 1000}, {}, 413, "characters"),
        ("embed nothing", "/embed", {}, {}, 400, "empty query"),
        ("item without id", "/items", {"text": "a red star"}, {}, 422, "bad id"),
        ("item bad id", "/items", {"id": "../../etc", "text": "a red star"}, {}, 422, "bad id"),
        ("item without media", "/items", {"id": "lonely"}, {}, 400, "at least one"),
        ("item bad image", "/items", {"id": "broken"}, {"image": ("x.png", b"nope", "image/png")}, 415, "decoded"),
        ("item id taken", "/items", {"id": "@existing", "text": "a red star"}, img, 409, "already holds a different"),
    ]


def test_bad_input_gets_json_4xx_and_the_service_survives(app) -> None:
    client = app["client"]
    existing = open_gallery(app["index_dir"])[Modality.TEXT].ids[0]
    cases = _bad_cases(app["root"])
    assert len(cases) >= 15
    failures = []
    for name, path, data, files, status, needle in cases:
        data = {k: (existing if v == "@existing" else v) for k, v in data.items()}
        response = client.post(path, data=data, files=files) if (data or files) else client.post(path, data={"x": ""})
        body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        if response.status_code != status or needle.lower() not in str(body.get("error", "")).lower():
            failures.append(f"{name}: {response.status_code} {response.text[:200]}")
    json_body = client.post("/search", json={"text": "a red star", "target": "image"})
    if json_body.status_code != 415 or "multipart" not in json_body.json()["error"]:
        failures.append(f"json body: {json_body.status_code} {json_body.text[:200]}")
    for url in ("/items/no-such-item/image", "/items/no-such-item/audio", "/nothing-here"):
        response = client.get(url)
        if response.status_code != 404 or "error" not in response.json():
            failures.append(f"GET {url}: {response.status_code} {response.text[:200]}")
    assert not failures, "\n".join(failures)
    # nothing died: a good request still works
    good = _search(client, "image", text="a large red circle on the left")
    assert good.status_code == 200 and len(good.json()["results"]) == 5
    assert client.get("/healthz").json() == {"status": "ok"}
    assert "broken" not in open_gallery(app["index_dir"])[Modality.IMAGE]


# ---- batching --------------------------------------------------------------------------------------------------------
def test_concurrent_requests_are_batched(app) -> None:
    client = app["client"]
    assert client.post("/stats/reset").status_code == 200
    captions = [r["caption"] for r in open_gallery(app["index_dir"])[Modality.TEXT].records()]

    async def fire() -> list[int]:
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=120) as aclient:
            responses = await asyncio.gather(
                *(
                    aclient.post("/search", data={"text": captions[i % len(captions)], "target": "image", "k": "3"})
                    for i in range(32)
                )
            )
        return [r.status_code for r in responses]

    assert asyncio.run(fire()) == [200] * 32
    text = client.get("/stats").json()["encoders"]["text"]
    assert text["requests"] == 32
    assert text["max_batch_size_seen"] > 1, text
    assert text["batches"] < 32


# ---- POST /items persists across a restart ---------------------------------------------------------------------------
def test_added_item_survives_restart(app) -> None:
    from conftest import SERVE_APP
    from ray import serve

    client = app["client"]
    train_images = sorted((app["root"] / "images" / "train").glob("*.png"))
    image, wav = train_images[0].read_bytes(), _wav_bytes(1.0)
    caption = "a brand new item for the gallery"
    response = client.post(
        "/items",
        data={"id": "added_1", "text": caption},
        files={"image": ("new.png", image, "image/png"), "audio": ("new.wav", wav, "audio/wav")},
    )
    assert response.status_code == 200, response.text
    assert sorted(response.json()["added_to"]) == ["audio", "image", "text"]
    assert not (app["index_dir"] / "media").exists()  # media are rows of the add's transaction in the store
    files = {"image": ("q.png", image, "image/png")}
    assert _search(client, "image", files=files).json()["results"][0]["id"] == "added_1"

    serve.delete(SERVE_APP)
    print(f"restart: serve.run took {run_serve_app(app['args']):.1f} s")
    top = _search(client, "image", files=files).json()["results"][0]
    assert top["id"] == "added_1" and top["caption"] == caption
    assert client.get(top["image_url"]).content == image
    assert client.get(top["audio_url"]).content == wav
    assert _search(client, "text", text=caption).json()["results"][0]["id"] == "added_1"
    assert client.post("/items", data={"id": "added_1", "text": "again"}).status_code == 409
    assert client.delete("/v1/items/added_1").status_code == 200
    assert client.get("/items/added_1/image").status_code == 404
    assert client.delete("/v1/items/added_1").status_code == 404

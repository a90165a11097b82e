"""The JSON /v1 API against the served app (Ray Serve, real HTTP): batches answered in order and equal to single
requests, `vector` and `item_id` queries, item metadata and paging, every limit per item and per batch with a message
naming where, and the OpenAPI document (bearer scheme, operation ids, tags, version).

The shared app runs with small limits (conftest SERVE_OVERRIDES): 200 text characters, 8 s of audio, 200x200 image
pixels, 0.5 MiB per upload, encoder batches of 8.
"""

from __future__ import annotations

import base64
import json
from importlib import metadata
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import SERVE_OVERRIDES, SERVE_UPLOAD_MB
from serve_util import png, wav

from cman.gallery_mirror import open_gallery
from cman.modality import Modality
from serve_app.schemas import DEFAULT_MAX_BATCH_QUERIES

pytestmark = pytest.mark.ray

UPLOAD = int(SERVE_UPLOAD_MB * 1024 * 1024)


@pytest.fixture(scope="module")
def client(served_app: dict):
    with httpx.Client(base_url=served_app["url"], timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def gallery(served_app: dict) -> dict:
    return open_gallery(served_app["index_dir"])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def distinct_item(gallery: dict, modality: str) -> tuple[str, dict, np.ndarray]:
    """An item whose `modality` vector is nearer to itself than to any other by a clear margin (no ties)."""
    index = gallery[Modality(modality)]
    vectors = index.vectors()  # (n, dim)
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    best = int(np.argmax(1.0 - sims.max(axis=1)))
    item_id = index.ids[best]
    return item_id, index.get(item_id), vectors[best]


def same_answer(a: dict, b: dict, tol: float = 1e-5) -> bool:
    """Two search answers equal up to float rounding: the same scores (within `tol`) and the same ids, where items
    whose scores tie within `tol` may come in either order."""
    ra, rb = a["results"], b["results"]
    if a["target"] != b["target"] or a["query_modalities"] != b["query_modalities"] or len(ra) != len(rb):
        return False
    if any(abs(x["score"] - y["score"]) > tol for x, y in zip(ra, rb, strict=True)):
        return False
    score_a = {r["id"]: r["score"] for r in ra}
    score_b = {r["id"]: r["score"] for r in rb}
    last = min(ra[-1]["score"], rb[-1]["score"]) if ra else 0.0
    for ids, other in ((score_a, score_b), (score_b, score_a)):
        for item, score in ids.items():
            if item in other and abs(other[item] - score) > tol:
                return False
            if item not in other and score > last + tol:  # only a tie at the cut-off may differ
                return False
    return True


def _error(response: httpx.Response, status: int, *needles: str) -> str:
    assert response.status_code == status, (status, response.status_code, response.text[:300])
    message = response.json()["error"]
    for needle in needles:
        assert needle in message, (needle, message)
    assert "Traceback" not in message and "site-packages" not in message, message
    return message


# ---- batches -----------------------------------------------------------------------------------------------------
def test_a_batch_of_32_text_queries_answers_like_32_single_requests(client: httpx.Client, gallery: dict) -> None:
    captions = sorted({r["caption"] for r in gallery[Modality.TEXT].records()})[:16]
    captions += [" ".join(reversed(c.split())) for c in captions]  # the demo's words, other token sequences
    captions = (captions * 2)[:32]
    assert client.post("/stats/reset").status_code == 200
    batch = client.post("/v1/search", json={"queries": [{"text": c} for c in captions], "target": "image", "k": 5})
    assert batch.status_code == 200, batch.text
    text_stats = client.get("/stats").json()["encoders"]["text"]
    answers = batch.json()["answers"]
    assert len(answers) == 32
    # one call to the text encoder, run in its batches of max_batch_size (8 here): not 32 round trips
    size = SERVE_OVERRIDES["max_batch_size"]
    assert text_stats["requests"] == 32 and text_stats["max_batch_size_seen"] == size, text_stats
    assert text_stats["batches"] == -(-32 // size), text_stats
    worst = 0.0
    for caption, answer in zip(captions, answers, strict=True):
        single = client.post("/v1/search", json={"text": caption, "target": "image", "k": 5}).json()
        form = client.post("/search", data={"text": caption, "target": "image", "k": "5"}).json()
        assert single == form, caption  # one JSON query takes the multipart route's path exactly
        assert same_answer(answer, single), (caption, answer, single)
        pairs = zip(answer["results"], single["results"], strict=True)
        worst = max(worst, *(abs(x["score"] - y["score"]) for x, y in pairs))
    print(f"\nbatch vs single: largest score difference {worst:.2e}")


def test_a_mixed_batch_is_answered_in_order(client: httpx.Client, gallery: dict) -> None:
    item_id, record, vector = distinct_item(gallery, "image")
    image = Path(record["image_path"]).read_bytes()
    queries = [
        {"item_id": item_id},
        {"vector": vector.tolist()},
        {"image": b64(image)},
        {"image": "data:image/png;base64," + b64(image)},
        {"text": record["caption"], "target": "text", "k": 2},
        {"item_id": item_id, "item_modality": "text", "target": "text"},
    ]
    response = client.post("/v1/search", json={"queries": queries, "target": "image", "k": 3})
    assert response.status_code == 200, response.text
    answers = response.json()["answers"]
    assert [a["target"] for a in answers] == ["image"] * 4 + ["text"] * 2
    assert [len(a["results"]) for a in answers] == [3, 3, 3, 3, 2, 3]
    assert [a["query_modalities"] for a in answers] == [["image"], [], ["image"], ["image"], ["text"], ["text"]]
    for answer in answers[:4]:
        assert answer["results"][0]["id"] == item_id and answer["results"][0]["score"] > 0.999, answer
    assert same_answer(answers[2], answers[3])  # base64 and a data URI: the same bytes
    assert answers[4]["results"][0]["score"] > 0.999 and answers[5]["results"][0]["score"] > 0.999


def test_vector_and_item_id_queries_find_the_item(client: httpx.Client, gallery: dict) -> None:
    for modality in ("image", "audio", "text"):
        item_id, record, vector = distinct_item(gallery, modality)
        by_id = client.post("/v1/search", json={"item_id": item_id, "target": modality, "k": 5})
        assert by_id.status_code == 200, by_id.text
        top = by_id.json()["results"][0]
        assert top["id"] == item_id and top["score"] > 0.999, (modality, by_id.json())
        stored = client.post("/v1/embed", json={"item_id": item_id, "item_modality": modality}).json()
        assert stored["modalities"] == [modality]
        np.testing.assert_allclose(stored["embedding"], vector, atol=1e-6)
        scaled = (3.0 * vector).tolist()  # any length: normalised before the search
        by_vector = client.post("/v1/search", json={"vector": scaled, "target": modality, "k": 5}).json()
        assert same_answer({**by_vector, "query_modalities": [modality]}, by_id.json()), (by_vector, by_id.json())
        assert by_vector["query_modalities"] == []
    # a stored vector's neighbours equal those of the embedding of the item's medium
    item_id, record, _ = distinct_item(gallery, "image")
    embedded = client.post("/v1/embed", json={"image": b64(Path(record["image_path"]).read_bytes())}).json()
    by_embedding = client.post("/v1/search", json={"vector": embedded["embedding"], "target": "image"}).json()
    assert by_embedding["results"][0]["id"] == item_id
    embed_batch = client.post("/v1/embed", json={"queries": [{"item_id": item_id}, {"text": "a red circle"}]})
    assert [a["modalities"] for a in embed_batch.json()["answers"]] == [["text"], ["text"]]  # the item's first


# ---- items ---------------------------------------------------------------------------------------------------------
def test_item_metadata_paging_and_delete(client: httpx.Client, gallery: dict) -> None:
    item_id, record, _ = distinct_item(gallery, "image")
    item = client.get(f"/v1/items/{item_id}").json()
    assert item["id"] == item_id and item["modalities"] == ["text", "audio", "image"], item
    assert item["caption"] == record["caption"] and item["image_url"] == f"/items/{item_id}/image"
    assert client.get(item["image_url"]).status_code == 200
    whole = client.get("/v1/items", params={"limit": 1000}).json()
    assert whole["total"] == len(whole["items"]) >= len(gallery[Modality.IMAGE])
    pages = [client.get("/v1/items", params={"offset": o, "limit": 5}).json() for o in range(0, whole["total"], 5)]
    assert [i["id"] for p in pages for i in p["items"]] == [i["id"] for i in whole["items"]]  # stable order
    assert pages[0]["offset"] == 0 and pages[0]["limit"] == 5 and pages[0]["total"] == whole["total"]
    past = client.get("/v1/items", params={"offset": whole["total"] + 10}).json()
    assert past["items"] == [] and past["total"] == whole["total"]
    _error(client.get("/v1/items", params={"limit": 0}), 422, "limit must be between 1 and 1000")
    _error(client.get("/v1/items", params={"offset": -1}), 422, "offset")

    added = client.post(
        "/items", data={"id": "v1_item", "text": "a small red circle on the left"}, files={"image": png(8, 8)}
    )
    assert added.status_code == 200, added.text
    try:
        item = client.get("/v1/items/v1_item").json()
        assert item["modalities"] == ["text", "image"] and item["image_url"] == "/items/v1_item/image", item
        last = client.get("/v1/items", params={"offset": whole["total"], "limit": 5}).json()
        assert [i["id"] for i in last["items"]] == ["v1_item"]  # a new item goes last
        top = client.post("/v1/search", json={"item_id": "v1_item", "target": "image", "k": 3}).json()["results"]
        assert "v1_item" in [r["id"] for r in top if r["score"] > 0.999], top  # itself (or an equal image) first
    finally:
        deleted = client.delete("/v1/items/v1_item")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True, deleted.text
    _error(client.delete("/v1/items/v1_item"), 404, "no item with id 'v1_item'")
    _error(client.get("/v1/items/v1_item"), 404, "no item with id 'v1_item'")
    _error(client.post("/v1/search", json={"item_id": "v1_item", "target": "image"}), 404, "item_id: no item")
    _error(client.get("/v1/items/bad%20id"), 422, "bad item id")


# ---- limits --------------------------------------------------------------------------------------------------------
def _limit_cases(image: bytes, text: str, dim: int) -> list[tuple]:
    """(what, json body, status, words the message must hold)."""
    big = b"\x89PNG\r\n\x1a\n" + b"\x00" * UPLOAD
    full_batch = {"queries": [{"text": text}] * (DEFAULT_MAX_BATCH_QUERIES + 1), "target": "image"}
    return [
        ("batch too large", full_batch, 413, [f"{DEFAULT_MAX_BATCH_QUERIES + 1} queries", "max_batch_queries"]),
        ("text too long", {"queries": [{"text": text}, {"text": "red " * 60}], "target": "image"}, 413,
         ["queries[1].text", "200-character limit"]),
        ("bad base64", {"queries": [{"text": text}, {"image": "not base64!"}], "target": "image"}, 400,
         ["queries[1].image is not valid base64"]),
        ("bad base64 single", {"audio": "%%%", "target": "audio"}, 400, ["audio is not valid base64"]),
        ("decoded size", {"queries": [{"image": b64(big)}], "target": "image"}, 413,
         ["queries[0].image", "over the 524,288-byte limit", "max_upload_mb"]),
        ("not an image", {"queries": [{"text": text}, {"image": b64(b"hello world")}], "target": "image"}, 415,
         ["queries[1].image", "not PNG, JPEG"]),
        ("data URI type", {"image": "data:text/plain;base64," + b64(image), "target": "image"}, 415,
         ["image is a data URI of type 'text/plain'"]),
        ("data URI not base64", {"image": "data:image/png,abc", "target": "image"}, 400, ["without ;base64"]),
        ("image pixels", {"queries": [{"text": text}, {"image": b64(png(201, 200))}], "target": "image"}, 413,
         ["queries[1].image", "201x200 pixels", "max_image_pixels"]),
        ("audio seconds", {"queries": [{"audio": b64(wav(8.5))}], "target": "audio"}, 413,
         ["queries[0].audio", "over the 8 s limit"]),
        ("k range", {"queries": [{"text": text}, {"text": text, "k": 0}], "target": "image"}, 422,
         ["queries[1].k: k must be between 1 and 100"]),
        ("unknown field", {"queries": [{"imgae": "x"}], "target": "image"}, 422, ["queries[0].imgae"]),
        ("no target", {"queries": [{"text": text}, {"text": text}]}, 422, ["queries[0].target is missing"]),
        ("empty query", {"queries": [{"text": text}, {}], "target": "image"}, 400, ["queries[1] is empty"]),
        ("two forms", {"queries": [{"text": text, "item_id": "x"}], "target": "image"}, 400,
         ["queries[0] mixes media and item_id"]),
        ("both shapes", {"text": text, "queries": [{"text": text}], "target": "image"}, 400, ["given beside queries"]),
        ("vector size", {"queries": [{"vector": [1.0, 2.0, 3.0]}], "target": "image"}, 422,
         ["queries[0].vector has 3 numbers", f"embeddings have {dim}"]),
        ("zero vector", {"vector": [0.0] * dim, "target": "image"}, 422, ["vector must be finite", "not all zero"]),
        ("empty batch", {"queries": [], "target": "image"}, 422, ["queries"]),
        ("unknown item", {"queries": [{"text": text}, {"item_id": "no-such"}], "target": "image"}, 404,
         ["queries[1].item_id: no item with id 'no-such'"]),
    ]  # fmt: skip


def test_limits_per_item_and_per_batch_name_where(client: httpx.Client, gallery: dict) -> None:
    _, record, vector = distinct_item(gallery, "image")
    image, text = Path(record["image_path"]).read_bytes(), record["caption"]
    for what, body, status, needles in _limit_cases(image, text, len(vector)):
        response = client.post("/v1/search", json=body)
        try:
            _error(response, status, *needles)
        except AssertionError as err:
            raise AssertionError(f"{what}: {err}") from None
    assert (
        client.post("/v1/embed", json={"queries": [{"image": "???"}]})
        .json()["error"]
        .startswith("queries[0].image is not valid base64")
    )
    # the whole request's shape: content type, JSON syntax, and a body of too many values refused before parsing
    _error(client.post("/v1/search", data={"text": text, "target": "image"}), 415, "send application/json")
    bad_json = client.post("/v1/search", content=b'{"text": "a', headers={"content-type": "application/json"})
    _error(bad_json, 400, "not valid JSON")
    bomb = b'{"target": "image", "queries": [' + b",".join([b"[]"] * 400_000) + b"]}"
    _error(client.post("/v1/search", content=bomb, headers={"content-type": "application/json"}), 413, "values")
    # at each limit: accepted
    at_limits = [{"text": "red " * 49 + "red"}, {"image": b64(png(200, 200))}, {"audio": b64(wav(7.9))}]
    ok = client.post("/v1/search", json={"queries": at_limits, "target": "image", "k": 100})
    assert ok.status_code == 200, ok.text
    full = client.post("/v1/search", json={"queries": [{"text": text}] * DEFAULT_MAX_BATCH_QUERIES, "target": "text"})
    assert full.status_code == 200 and len(full.json()["answers"]) == DEFAULT_MAX_BATCH_QUERIES


# ---- OpenAPI -------------------------------------------------------------------------------------------------------
def test_openapi_declares_bearer_auth_operation_ids_tags_and_version(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["info"]["version"] == metadata.version("cman")
    assert spec["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["HTTPBearer"]["description"],
    }
    ops = {(m.upper(), p): op for p, methods in spec["paths"].items() for m, op in methods.items()}
    ids = {key: op["operationId"] for key, op in ops.items()}
    assert ids == {
        ("POST", "/v1/search"): "search_v1",
        ("POST", "/v1/embed"): "embed_v1",
        ("GET", "/v1/items"): "list_items_v1",
        ("GET", "/v1/items/{item_id}"): "get_item_v1",
        ("DELETE", "/v1/items/{item_id}"): "delete_item_v1",
        ("GET", "/healthz"): "healthz",
        ("POST", "/search"): "search",
        ("POST", "/embed"): "embed",
        ("POST", "/items"): "add_item",
        ("GET", "/items/{item_id}/image"): "item_image",
        ("GET", "/items/{item_id}/audio"): "item_audio",
        ("GET", "/stats"): "stats",
        ("POST", "/stats/reset"): "reset_stats",
    }
    for key, op in ops.items():
        assert op["tags"] and set(op["tags"]) <= {"query", "items", "service"}, key
        assert op.get("security") == (None if key == ("GET", "/healthz") else [{"HTTPBearer": []}]), key
    body = spec["paths"]["/v1/search"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/SearchRequest")
    fields = spec["components"]["schemas"]["SearchRequest"]["properties"]
    assert {"text", "image", "audio", "vector", "item_id", "target", "k", "queries"} <= set(fields)
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text
    json.dumps(spec)  # serialisable as served

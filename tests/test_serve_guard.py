"""Access key, state-change refusals and every input limit, over real HTTP against the served app.

The shared app runs with small limits (conftest SERVE_OVERRIDES): 200 text characters, 8 s of audio, 200x200 image
pixels, 0.5 MiB per upload (body limit 3 x 0.5 + 1 MiB), 8 form fields. Each is sent at the limit and just past it.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from conftest import SERVE_OVERRIDES, SERVE_UPLOAD_MB
from serve_util import chunked, extra_ingress, multipart, png, wav

pytestmark = pytest.mark.ray

KEY = "test-key-7f3a9c1e"
UPLOAD = int(SERVE_UPLOAD_MB * 1024 * 1024)
BODY_LIMIT = 3 * UPLOAD + 1024 * 1024
CAPTION = "a large red circle on the left"


@pytest.fixture(scope="module")
def client(served_app: dict):
    with httpx.Client(base_url=served_app["url"], timeout=120) as c:
        yield c


def _search(client: httpx.Client, data: dict | None = None, files: dict | None = None, **kw) -> httpx.Response:
    return client.post("/search", data={"target": "image", "k": "3", **(data or {})}, files=files or {}, **kw)


def _error(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/json"), response.text[:200]
    message = response.json()["error"]
    assert "Traceback" not in message and "/tmp/" not in message and "site-packages" not in message, message
    return message


# ---- access key ----------------------------------------------------------------------------------------------------
def test_api_key_required_everywhere_but_healthz_and_the_page(served_app: dict) -> None:
    good = {"Authorization": f"Bearer {KEY}"}
    with extra_ingress(served_app, "keyed", key=KEY) as url, httpx.Client(base_url=url, timeout=120) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        page = c.get("/")
        assert page.status_code == 200 and 'id="apikey"' in page.text
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}, {"X-Key": KEY}):
            for method, path in (("POST", "/search"), ("GET", "/stats"), ("GET", "/openapi.json"), ("POST", "/items")):
                r = c.request(method, path, headers=headers, data={"target": "image", "text": CAPTION})
                assert r.status_code == 401, (headers, path, r.text)
                assert "API key" in _error(r) and r.headers["www-authenticate"] == "Bearer"
        assert c.post("/search", headers=good, data={"target": "image", "text": CAPTION}).status_code == 200
        assert c.get("/stats", headers=good).status_code == 200
        assert c.get("/openapi.json", headers=good).status_code == 200
        added = c.post("/items", headers=good, data={"id": "keyed_item", "text": "added with the key"})
        assert added.status_code == 200, added.text
    logs = Path("/tmp/ray/session_latest/logs")
    assert logs.is_dir(), logs
    leaked = [p for p in logs.rglob("*") if p.is_file() and p.stat().st_size < 50e6 and KEY.encode() in p.read_bytes()]
    assert not leaked, f"the API key appears in {leaked}"


def test_state_changes_refused_without_key_on_a_non_loopback_bind(served_app: dict) -> None:
    with extra_ingress(served_app, "public", host="0.0.0.0") as url, httpx.Client(base_url=url, timeout=120) as c:
        for path, data in (("/items", {"id": "public_item", "text": "x"}), ("/stats/reset", {})):
            r = c.post(path, data=data)
            assert r.status_code == 403 and "without an API key" in _error(r), r.text
        assert c.post("/search", data={"target": "image", "text": CAPTION}).status_code == 200


def test_request_timeout_answers_504(served_app: dict) -> None:
    with extra_ingress(served_app, "hasty", request_timeout_s=0.001) as url:
        r = httpx.post(url + "/search", data={"target": "image", "text": CAPTION}, timeout=60)
    assert r.status_code == 504 and "request_timeout_s" in _error(r) and r.headers["retry-after"] == "1"


@pytest.mark.parametrize(
    "headers, needle",
    [({"Origin": "http://evil.example"}, "cross-origin"), ({"Host": "evil.example"}, "not a loopback name")],
)
def test_cross_origin_and_rebound_host_cannot_change_state(client: httpx.Client, headers: dict, needle: str) -> None:
    r = client.post("/items", data={"id": "csrf_item", "text": "x"}, headers=headers)
    assert r.status_code == 403 and needle in _error(r)
    same = client.post("/stats/reset", headers={"Origin": str(client.base_url).rstrip("/")})
    assert same.status_code == 200, same.text


# ---- limits at and past ----------------------------------------------------------------------------------------------
def test_text_limits(client: httpx.Client) -> None:
    limit = SERVE_OVERRIDES["max_text_chars"]
    assert _search(client, {"text": ("red " * 60)[: limit - 1] + "x"}).status_code == 200
    r = _search(client, {"text": "x" * (limit + 1)})
    assert r.status_code == 413 and f"over the {limit}-character limit" in _error(r)
    for text in ("\x00" * 50, "\x00\x01\x1b\u200b"):
        r = _search(client, {"text": text})
        assert r.status_code == 400 and "control characters" in _error(r)


def test_audio_duration_limit(client: httpx.Client) -> None:
    limit = SERVE_OVERRIDES["max_audio_seconds"]
    ok = _search(client, files={"audio": ("a.wav", wav(limit), "audio/wav")})
    assert ok.status_code == 200, ok.text
    r = _search(client, files={"audio": ("a.wav", wav(limit + 0.01), "audio/wav")})
    assert r.status_code == 413 and "max_audio_seconds" in _error(r)


def test_image_pixel_limit(client: httpx.Client) -> None:
    assert _search(client, files={"image": ("a.png", png(200, 200), "image/png")}).status_code == 200
    r = _search(client, files={"image": ("a.png", png(200, 201), "image/png")})
    assert r.status_code == 413 and "40,000-pixel limit" in _error(r)


def test_upload_byte_limit(client: httpx.Client) -> None:
    ok = _search(client, files={"image": ("a.png", png(64, 64, pad_to=UPLOAD), "image/png")})
    assert ok.status_code == 200, ok.text
    r = _search(client, files={"image": ("a.png", png(64, 64, pad_to=UPLOAD + 1), "image/png")})
    assert r.status_code == 413 and f"{UPLOAD:,}-byte limit" in _error(r)


@pytest.mark.parametrize("streamed", [False, True])
def test_body_limit_counts_streamed_bytes(client: httpx.Client, streamed: bool) -> None:
    files = {"image": ("a.png", png(64, 64, pad_to=UPLOAD), "image/png")}
    body, ctype = multipart({"target": "image", "k": "3"}, files)
    at_limit = body + b"\r\n" + b"e" * (BODY_LIMIT - len(body) - 2)  # an epilogue, ignored by the parser
    assert len(at_limit) == BODY_LIMIT
    for payload, refused in ((at_limit, False), (at_limit + b"e", True)):
        content = chunked(payload) if streamed else payload
        r = client.post("/search", content=content, headers={"content-type": ctype})
        if refused:
            assert r.status_code == 413 and "request body" in _error(r), r.text[:300]
        else:
            assert r.status_code == 200, r.text[:300]
    assert _search(client, {"text": CAPTION}).status_code == 200


def test_form_field_limit(client: httpx.Client) -> None:
    fields = [("target", "image"), ("k", "3"), ("text", CAPTION)]
    at_limit = fields + [(f"extra{i}", str(i)) for i in range(SERVE_OVERRIDES.get("max_form_fields", 8) - 3)]
    body, ctype = multipart({}, {name: (None, value) for name, value in at_limit})
    assert client.post("/search", content=body, headers={"content-type": ctype}).status_code == 200
    past = at_limit + [("one_too_many", "x")]
    body, ctype = multipart({}, {name: (None, value) for name, value in past})
    r = client.post("/search", content=body, headers={"content-type": ctype})
    assert r.status_code == 413 and "max_form_fields" in _error(r)


def test_k_and_id_limits(client: httpx.Client) -> None:
    gallery = client.get("/stats").json()["index"]["image"]
    assert len(_search(client, {"text": CAPTION, "k": "100"}).json()["results"]) == min(gallery, 100)
    for k in ("0", "101"):
        r = _search(client, {"text": CAPTION, "k": k})
        assert r.status_code == 422 and "k must be between 1 and 100" in _error(r)
    long_id = "i" * 128
    assert client.post("/items", data={"id": long_id, "text": "an item with a long id"}).status_code == 200
    assert client.get(f"/items/{long_id}/image").status_code == 404
    r = client.post("/items", data={"id": long_id + "i", "text": "x"})
    assert r.status_code == 422 and "bad id" in _error(r)
    assert client.get(f"/items/{long_id}i/image").status_code == 422

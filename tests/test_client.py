"""`cman.client`: what it sends and how it reads answers (an httpx mock transport, no Ray), then round trips against
the served app (Ray Serve, real HTTP) with and without an API key."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from cman import client as client_module
from cman.client import AsyncClient, Client, CMANError

KEY = "client-key-51c0e2"


def mocked(handler, **kwargs) -> Client:
    """A Client whose requests go to `handler` (an httpx.MockTransport)."""
    c = Client("http://cman.test/prefix", **kwargs)
    c.http = httpx.Client(base_url=c.url, headers=c.headers, transport=httpx.MockTransport(handler))
    return c


def png_bytes(size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


# ---- without a service -----------------------------------------------------------------------------------------------
def test_the_client_imports_no_server_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys, cman.client\nprint(sorted({'ray', 'fastapi', 'starlette', 'torch', 'mlflow'} & set(sys.modules)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", (proc.stdout, proc.stderr)


def test_requests_carry_the_key_base64_media_and_vectors(tmp_path) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"answers": [{"ok": 1}, {"ok": 2}]})

    path = tmp_path / "red.png"
    path.write_bytes(png_bytes())
    c = mocked(handler, api_key=KEY)
    c.search("a red circle", image=path, target="audio", k=3)
    c.search(image=Image.open(path), audio=(np.zeros(1600, np.float32), 16000), target="image")
    c.search(vector=np.ones(4, np.float32), target="text")
    assert c.search_batch([{"text": "a"}, {"item_id": "x", "item_modality": "text"}], k=2) == [{"ok": 1}, {"ok": 2}]
    c.search(image=np.zeros((4, 4, 3), np.uint8))
    bodies = [json.loads(r.content) for r in seen]
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in seen)
    assert all(str(r.url).startswith("http://cman.test/prefix/v1/search") for r in seen)
    assert bodies[0] == {
        "text": "a red circle",
        "image": base64.b64encode(path.read_bytes()).decode(),
        "target": "audio",
        "k": 3,
    }
    assert base64.b64decode(bodies[1]["image"]).startswith(b"\x89PNG")
    wav = base64.b64decode(bodies[1]["audio"])
    assert wav[:4] == b"RIFF" and sf.info(io.BytesIO(wav)).samplerate == 16000
    assert bodies[2] == {"vector": [1.0, 1.0, 1.0, 1.0], "target": "text", "k": 10}
    assert bodies[3] == {
        "queries": [{"text": "a"}, {"item_id": "x", "item_modality": "text"}],
        "target": "image",
        "k": 2,
    }
    assert base64.b64decode(bodies[4]["image"]).startswith(b"\x89PNG")
    with pytest.raises(TypeError, match="image must be a path, bytes"):
        c.search(image=3.5)

    seen.clear()
    c.add("my-item", text="a red circle", image=png_bytes())
    c.get("a/b")
    c.delete("my-item")
    c.items(offset=10, limit=5)
    assert [(r.method, r.url.raw_path.decode().split("?")[0]) for r in seen] == [
        ("POST", "/prefix/items"),
        ("GET", "/prefix/v1/items/a%2Fb"),
        ("DELETE", "/prefix/v1/items/my-item"),
        ("GET", "/prefix/v1/items"),
    ]
    form = seen[0].content
    assert seen[0].headers["content-type"].startswith("multipart/form-data")
    assert b'name="id"\r\n\r\nmy-item' in form and b'name="text"\r\n\r\na red circle' in form and b"\x89PNG" in form
    assert seen[3].url.params == httpx.QueryParams({"offset": "10", "limit": "5"})


def test_503_is_retried_after_its_retry_after_within_bounds(monkeypatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", sleeps.append)
    answers = iter([(503, "2"), (503, "120"), (200, None)])

    def handler(request: httpx.Request) -> httpx.Response:
        status, after = next(answers)
        if status == 503:
            return httpx.Response(503, json={"error": "busy; retry"}, headers={"Retry-After": after})
        return httpx.Response(200, json={"status": "ok"})

    assert mocked(handler, max_wait_s=5).health() == {"status": "ok"}
    assert sleeps == [2.0, 5.0]  # Retry-After honoured, capped at max_wait_s

    sleeps.clear()
    calls = []

    def always_busy(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(503, json={"error": "the service is busy"}, headers={"Retry-After": "1"})

    with pytest.raises(CMANError) as err:
        mocked(always_busy, retries=2).search("a dog")
    assert err.value.status == 503 and err.value.message == "the service is busy" and len(calls) == 3
    assert sleeps == [1.0, 1.0]


def test_errors_carry_status_and_the_services_message() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/items"):
            return httpx.Response(409, json={"error": "id 'x' already holds a different item"})
        if request.method == "DELETE":
            return httpx.Response(404, json={"error": "no item with id 'gone' in the gallery"})
        if request.url.path.endswith("/search"):
            return httpx.Response(401, json={"error": "missing or wrong API key: send Authorization: Bearer <key>"})
        return httpx.Response(502, text="Bad gateway")

    c = mocked(handler)
    with pytest.raises(CMANError, match="409: id 'x' already holds a different item") as err:
        c.add("x", text="a")
    assert err.value.status == 409
    with pytest.raises(CMANError, match="missing or wrong API key.*pass api_key="):
        c.search("a")
    with pytest.raises(CMANError, match="404: no item with id 'gone'"):
        c.delete("gone")
    assert c.delete("gone", missing_ok=True) is None
    with pytest.raises(CMANError, match="502: Bad gateway"):
        c.get("x")

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    with pytest.raises(CMANError, match="could not reach http://cman.test/prefix/healthz: connection refused") as err:
        mocked(unreachable).health()
    assert err.value.status == 0


# ---- against the served app ------------------------------------------------------------------------------------------
def _round_trip(c: Client, item_id: str) -> None:
    """add, get, search (by item, text, batch), embed, items, delete, each through the client."""
    added = c.add(item_id, text="a small red circle on the left", image=png_bytes(12))
    assert added["id"] == item_id and sorted(added["added_to"]) == ["image", "text"]
    assert c.add(item_id, text="a small red circle on the left", image=png_bytes(12))["id"] == item_id  # idempotent
    with pytest.raises(CMANError) as err:
        c.add(item_id, text="another item")
    assert err.value.status == 409 and "already holds a different item" in err.value.message
    item = c.get(item_id)
    assert item == {
        "id": item_id,
        "modalities": ["text", "image"],
        "caption": "a small red circle on the left",
        "image_url": f"/items/{item_id}/image",
    }
    hits = c.search(item_id=item_id, target="image", k=3)["results"]
    assert item_id in [h["id"] for h in hits if h["score"] > 0.999], hits
    by_text = c.search("a small red circle on the left", target="text", k=3)["results"]
    assert by_text[0]["score"] > 0.999 and item_id in [h["id"] for h in by_text if h["score"] > 0.999]
    embedding = c.embed(item_id=item_id, item_modality="image")["embedding"]
    assert c.search(vector=embedding, target="image", k=1)["results"][0]["score"] > 0.999
    batch = c.search_batch([{"item_id": item_id}, {"image": png_bytes(12)}, {"text": "a red circle"}], k=2)
    assert [len(a["results"]) for a in batch] == [2, 2, 2]
    assert [a["modalities"] for a in c.embed_batch([{"text": "a red circle"}, {"item_id": item_id}])] == [
        ["text"],
        ["text"],
    ]
    listed = [i["id"] for i in c.iter_items(page_size=7)]
    assert listed[-1] == item_id and len(listed) == c.items(limit=1)["total"]
    assert c.delete(item_id)["deleted"] is True
    with pytest.raises(CMANError) as err:
        c.get(item_id)
    assert err.value.status == 404 and item_id in err.value.message
    assert c.delete(item_id, missing_ok=True) is None


@pytest.mark.ray
def test_client_round_trip_without_a_key(served_app: dict) -> None:
    with Client(served_app["url"], timeout=120) as c:
        assert c.health() == {"status": "ok"}
        _round_trip(c, "client_item")
        with pytest.raises(CMANError) as err:
            c.search(image=b"not an image")
        assert err.value.status == 415 and err.value.message.startswith("image: ")

    async def twin() -> tuple:
        async with AsyncClient(served_app["url"], timeout=120) as a:
            return await asyncio.gather(a.search("a red circle", target="image", k=2), a.items(limit=2))

    found, page = asyncio.run(twin())
    assert len(found["results"]) == 2 and len(page["items"]) == 2


@pytest.mark.ray
def test_client_with_an_api_key(served_app: dict) -> None:
    from serve_util import extra_ingress

    with extra_ingress(served_app, "keyed_client", key=KEY) as url:
        with Client(url, api_key=KEY, timeout=120) as c:
            _round_trip(c, "keyed_client_item")
        for key in (None, "wrong-key"):
            with Client(url, api_key=key, timeout=120) as c:
                with pytest.raises(CMANError) as err:
                    c.search("a red circle", target="image")
                assert c.health() == {"status": "ok"}  # open without a key
            assert err.value.status == 401, err.value
            assert "missing or wrong API key" in err.value.message and "api_key=" in err.value.message

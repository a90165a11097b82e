"""The front door without Ray: text bounded before normalisation, the guard (Host on every route, slow and
oversized bodies, the in-flight upload budget, security headers, fail closed), formats allowed by content, EXIF
stripped on ingest, clean error messages, and the quickstart's API key in force."""

from __future__ import annotations

import asyncio
import io
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from cman.data.errors import DataError, LimitError
from serve_app.errors import RequestError
from serve_app.security import Guard, GuardSettings, page_policy


# ---- text ------------------------------------------------------------------------------------------------------------
def test_text_is_bounded_before_nfkc_runs(monkeypatch) -> None:
    """U+FDFA expands 18x under NFKC: a 1 MiB field is refused on its raw length, never normalised."""
    from cman.data import text

    seen: list[int] = []
    real = unicodedata.normalize
    monkeypatch.setattr(text.unicodedata, "normalize", lambda form, s: seen.append(len(s)) or real(form, s))
    with pytest.raises(LimitError, match="over the 200-character limit"):
        text.clean_caption("\ufdfa" * (1 << 20), max_chars=200)
    assert seen == []
    # within the raw bound, normalisation decides: 40 raw characters become 720, over the limit after NFKC
    with pytest.raises(LimitError, match="720 characters"):
        text.clean_caption("\ufdfa" * 40, max_chars=200)
    assert seen == [40]
    assert text.clean_caption("  a  red\u0000 circle ", max_chars=200) == "a red circle"


# ---- the guard, driven as ASGI -----------------------------------------------------------------------------------
class _App:
    """A stand-in route: reads the whole body, answers 200 with its length."""

    def __init__(self, settings: GuardSettings | None) -> None:
        self.state = type("State", (), {})()
        if settings is not None:
            self.state.guard = settings

    async def __call__(self, scope, receive, send) -> None:
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = json.dumps({"received": size}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def _request(
    settings: GuardSettings | None,
    path: str = "/search",
    method: str = "POST",
    host: str = "127.0.0.1:8000",
    chunks: list[bytes] | None = None,
    stall: bool = False,
) -> tuple[int, dict[str, str], dict]:
    """Run one request through Guard(app); `stall`: after `chunks` the client sends nothing more (a trickler)."""
    app = _App(settings)
    chunks = list(chunks if chunks is not None else [b"x" * 10])
    headers = [(b"host", host.encode()), (b"content-type", b"multipart/form-data; boundary=b")]
    scope = {"type": "http", "method": method, "path": path, "headers": headers, "app": app}
    sent: list[dict] = []

    async def receive() -> dict:
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks) or stall}
        if stall:
            await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(Guard(app)(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    answer = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], answer, json.loads(body) if body else {}


def test_host_is_checked_on_every_route_of_a_loopback_service_without_a_key() -> None:
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 must not read searches, media or stats."""
    settings = GuardSettings(bind_host="127.0.0.1")
    for path, method in (("/search", "POST"), ("/embed", "POST"), ("/stats", "GET"), ("/items/a/image", "GET")):
        status, _, body = _request(settings, path, method, host="evil.example:8000")
        assert status == 403 and "not a loopback name" in body["error"], (path, status, body)
        assert _request(settings, path, method, host="localhost:8000")[0] == 200, path
    keyed = GuardSettings(bind_host="127.0.0.1", key_sha256=b"k" * 32)  # with a key, the key decides
    assert _request(keyed, "/healthz", "GET", host="evil.example")[0] == 200


def test_the_guard_fails_closed_without_its_settings() -> None:
    status, headers, body = _request(None)
    assert status == 503 and "starting" in body["error"] and headers["retry-after"] == "1"


def test_a_trickling_body_gets_408_within_the_body_timeout() -> None:
    settings = GuardSettings(body_timeout_s=0.3)
    status, _, body = _request(settings, chunks=[b"x" * 100], stall=True)
    assert status == 408 and "not received within 0.3 s" in body["error"]
    assert Guard.inflight == 0  # what the trickler had sent is no longer counted


def test_uploads_in_flight_over_the_budget_get_503_and_oversized_bodies_413() -> None:
    settings = GuardSettings(max_body_bytes=1000, max_inflight_bytes=500)
    Guard.inflight = 400  # other requests hold 400 bytes right now
    try:
        status, headers, body = _request(settings, chunks=[b"x" * 200])
    finally:
        Guard.inflight -= 400
    assert status == 503 and headers["retry-after"] == "1" and "being received" in body["error"]
    roomy = GuardSettings(max_body_bytes=1000, max_inflight_bytes=5000)
    status, _, body = _request(roomy, chunks=[b"x" * 600, b"x" * 600])
    assert status == 413 and "1,000-byte limit" in body["error"]
    assert _request(settings, chunks=[b"x" * 300, b"x" * 100])[2] == {"received": 400}
    assert Guard.inflight == 0


def test_a_form_of_many_fields_is_refused_while_it_streams() -> None:
    """Counted in the stream, chunk by chunk, before a parser builds any field (a boundary split across chunks too)."""
    from serve_app.security import FieldCounter

    settings = GuardSettings(max_form_fields=8)
    field = b"--b\r\nContent-Disposition: form-data; name=f\r\n\r\nv\r\n"
    eight, nine = field * 8 + b"--b--\r\n", field * 9 + b"--b--\r\n"
    assert _request(settings, chunks=[eight[:30], eight[30:]])[0] == 200
    status, _, body = _request(settings, chunks=[nine[i : i + 7] for i in range(0, len(nine), 7)])
    assert status == 413 and "max_form_fields" in body["error"]
    counter = FieldCounter.for_type("application/x-www-form-urlencoded", 3)
    assert not counter.over(b"a=1&b=2&c=3") and counter.over(b"&d=4")


def test_every_answer_says_nosniff_and_the_page_forbids_framing() -> None:
    html = "<html><script>go()</script></html>"
    settings = GuardSettings(page_policy=page_policy(html))
    _, headers, _ = _request(settings, "/", "GET")
    assert headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert "'sha256-" in headers["content-security-policy"]  # the page's inline script, allowed by its hash
    _, headers, _ = _request(settings, "/search")
    assert headers["x-content-type-options"] == "nosniff" and "content-security-policy" not in headers
    _, headers, _ = _request(settings, "/search", host="evil.example")  # refusals too
    assert headers["x-content-type-options"] == "nosniff"


def test_the_bind_address_is_asked_of_serve_and_an_unknown_one_is_guarded_as_exposed(monkeypatch) -> None:
    import ray

    from serve_app.ingress import bound_host

    def no_controller(*args, **kwargs):
        raise ValueError("Failed to look up actor SERVE_CONTROLLER_ACTOR")

    monkeypatch.setattr(ray, "get_actor", no_controller)
    assert bound_host("127.0.0.1") == "0.0.0.0"

    class Controller:  # Serve's controller as the Ingress asks it: what its proxies bind
        def __init__(self, host: str) -> None:
            self.get_http_config = type("Method", (), {"remote": lambda _: type("Options", (), {"host": host})()})()

    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    for declared, bound, guarded in [
        ("127.0.0.1", "0.0.0.0", "0.0.0.0"),  # Serve was already up on all interfaces: the app must know
        ("0.0.0.0", "127.0.0.1", "0.0.0.0"),  # declared exposed: the stricter of the two
        ("127.0.0.1", "::1", "::1"),
    ]:
        monkeypatch.setattr(ray, "get_actor", lambda *a, bound=bound, **k: Controller(bound))
        assert bound_host(declared) == guarded, (declared, bound)


# ---- formats by content --------------------------------------------------------------------------------------------
def _image_bytes(fmt: str, **save) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 30, 30)).save(out, format=fmt, **save)
    return out.getvalue()


def _audio_bytes(rate: int, channels: int, fmt: str = "WAV", seconds: float = 0.1) -> bytes:
    out = io.BytesIO()
    sf.write(out, np.zeros((int(rate * seconds), channels), dtype="float32"), rate, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_allowed_image_formats_pass(fmt: str) -> None:
    from serve_app.uploads import check_image_format

    assert check_image_format(_image_bytes(fmt)) == fmt


@pytest.mark.parametrize(
    "data",
    [b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", _image_bytes("TIFF"), _image_bytes("PPM"), b"\x00" * 64],
    ids=["eps", "tiff", "ppm", "zeros"],
)
def test_other_image_formats_are_415_whatever_their_content_type(data: bytes) -> None:
    from cman.data.image import UPLOAD_FORMATS, decode_image
    from serve_app.uploads import check_image_format

    with pytest.raises(RequestError, match="not PNG, JPEG, WebP, GIF or BMP") as err:
        check_image_format(data)
    assert err.value.status == 415
    with pytest.raises(DataError, match="send a PNG, JPEG, WEBP, GIF, BMP image") as decoded:
        decode_image(data, formats=UPLOAD_FORMATS)  # the replica refuses them too (never Ghostscript for EPS)
    assert "0x" not in str(decoded.value)  # no "<_io.BytesIO object at 0x...>"


def test_audio_formats_and_rate_times_channels_times_seconds_are_checked_before_decoding() -> None:
    """8 channels at 384 kHz cost 32x a stereo 48 kHz clip per second: refused from the header once rate x channels
    x seconds passes a minute of 48 kHz stereo; 8 s of mono 384 kHz stays accepted (decoded, resampled)."""
    from serve_app.uploads import check_audio_format

    assert check_audio_format(_audio_bytes(16_000, 1)) == "WAV"
    assert check_audio_format(_audio_bytes(48_000, 2, "FLAC")) == "FLAC"
    assert check_audio_format(_audio_bytes(384_000, 1, "FLAC", seconds=8.0), max_seconds=60) == "FLAC"
    bomb = _audio_bytes(384_000, 8, "FLAC", seconds=2.5)  # 7.7 M samples to decode, from a small FLAC of silence
    with pytest.raises(RequestError, match="8 channel\\(s\\) at 384,000 Hz for 2.5 s") as err:
        check_audio_format(bomb, max_seconds=60)
    assert err.value.status == 415 and len(bomb) < 2_000_000
    assert check_audio_format(bomb, max_seconds=1.0) == "FLAC"  # only max_audio_seconds of it could ever be decoded
    with pytest.raises(RequestError, match="AIFF"):
        check_audio_format(_audio_bytes(16_000, 1, "AIFF"))


def test_stored_images_lose_exif_and_keep_their_orientation() -> None:
    from serve_app.media import strip_image_metadata

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees to show
    exif[0x010E] = "home address, GPS"  # ImageDescription
    original = _image_bytes("JPEG", exif=exif.tobytes())
    stripped = strip_image_metadata(original)
    with Image.open(io.BytesIO(stripped)) as img:
        assert not img.getexif() and "exif" not in img.info
        assert img.size == (6, 8)  # transposed as it was shown (and embedded)
    plain = _image_bytes("PNG")
    assert strip_image_metadata(plain) is plain  # nothing to strip: the same bytes


# ---- smaller ---------------------------------------------------------------------------------------------------------
def test_error_messages_carry_no_object_reprs_and_ids_match_whole() -> None:
    from serve_app.retriever import ITEM_ID

    err = RequestError(415, "cannot identify image file <_io.BytesIO object at 0x7f3a2c1b9e40>")
    assert "0x" not in err.message and "the upload" in err.message
    assert ITEM_ID.fullmatch("item-1.a") and not ITEM_ID.fullmatch("item-1\n") and not ITEM_ID.fullmatch("-x")


def test_quickstart_serves_with_the_api_key_it_was_given(monkeypatch, trained_checkpoint: Path, tmp_path) -> None:
    """`cman quickstart --set serve.api_key=...`: the key is not saved in the checkpoint's config, so the quickstart
    must hand it to the service itself (it used to serve open while the user believed it was keyed)."""
    import contextlib

    import jobs.build_index
    import jobs.cluster
    import jobs.quickstart as qs
    import serve_app.run
    from serve_app.app import ServeArgs, resolve_serve_config

    served: dict = {}
    monkeypatch.setattr(qs, "ensure_dataset", lambda *a, **k: None)
    monkeypatch.setattr(jobs.cluster, "session", contextlib.nullcontext)
    monkeypatch.setattr(qs, "train_best", lambda config, where: (trained_checkpoint, {}))
    monkeypatch.setattr(jobs.build_index, "build_index", lambda *a, **k: {"image": 1})
    monkeypatch.setattr("cman.metrics.format_table", lambda test: "")
    monkeypatch.setattr(serve_app.run, "serve_forever", lambda **kwargs: served.update(kwargs))
    qs.quickstart(tmp_path / "qs", overrides={"serve.api_key": "s3cret-key"})
    assert served["settings"] == {"api_key": "s3cret-key"}
    args = ServeArgs(checkpoint=str(trained_checkpoint), index_dir=str(tmp_path), serve=served["settings"])
    assert resolve_serve_config(args).api_key == "s3cret-key"  # what build_app turns into the guard's key
    assert "s3cret-key" not in (trained_checkpoint / "config.yaml").read_text()

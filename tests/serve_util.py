"""Helpers for the Serve tests: extra ingress applications over the shared app's deployments, media builders."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import soundfile as sf
from conftest import SERVE_APP, serve_run_within
from PIL import Image


@contextmanager
def extra_ingress(
    served_app: dict, name: str, key: str | None = None, host: str = "127.0.0.1", **settings
) -> Iterator[str]:
    """A second ingress (app `name` at `/name`) over the shared app's Retriever and encoders; yields its base URL."""
    from ray import serve

    from cman.modality import Modality
    from serve_app.app import build_ingress, resolve_serve_config
    from serve_app.encoders import DEPLOYMENT_NAMES

    cfg = resolve_serve_config(served_app["args"]).model_copy(update=settings)
    retriever = serve.get_deployment_handle("Retriever", SERVE_APP)
    encoders = {m.value: serve.get_deployment_handle(DEPLOYMENT_NAMES[m], SERVE_APP) for m in Modality}
    serve_run_within(build_ingress(cfg, key, host, retriever, encoders), name, f"/{name}", timeout_s=120)
    try:
        yield f"{served_app['url']}/{name}"
    finally:
        serve.delete(name)


def wav(seconds: float, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(round(seconds * rate))) / rate
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def png(width: int, height: int, pad_to: int | None = None) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    data = buf.getvalue()
    return data + b"\x00" * (pad_to - len(data)) if pad_to else data  # PIL ignores bytes after IEND


def multipart(data: dict, files: dict) -> tuple[bytes, str]:
    """The encoded multipart body and its content type, as httpx would send them."""
    request = httpx.Request("POST", "http://x/", data=data, files=files)
    return request.read(), request.headers["content-type"]


def chunked(body: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    """The body as a generator: httpx then sends it with Transfer-Encoding: chunked (no Content-Length)."""
    for start in range(0, len(body), size):
        yield body[start : start + size]

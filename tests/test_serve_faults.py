"""Real faults under load: SIGKILL an encoder replica's process and then the Retriever's while 8 clients search with
text, audio and image queries; and audio bombs sent at a replica whose peak memory is measured.

Traffic goes to 127.0.0.1 only. Kills follow progress, not the clock: each deployment is killed once STEADY requests
have been answered since the previous replacement, and the load ends STEADY answers after the last replacement (so a
fast and a slow box see the same phases). Replicas are found by their process title
(`ray::ServeReplica:<app>:<deployment>`) and killed from outside with SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import soundfile as sf
from conftest import SERVE_APP
from serve_util import wav

from cman.gallery_mirror import open_gallery
from cman.modality import Modality

pytestmark = pytest.mark.ray

CONCURRENCY = 8
KILLS = ("TextEncoder", "Retriever")  # killed in this order
STEADY = 24  # answers before each kill and after the last replacement
LOAD_TIMEOUT_S = 240.0


def replica_pids(deployment: str) -> list[int]:
    title = f"ServeReplica:{SERVE_APP}:{deployment}"
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if title in cmdline and "ray::" in cmdline:
            pids.append(proc.pid)
    return pids


def wait_replaced(deployment: str, old: int, timeout_s: float = 90.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = [p for p in replica_pids(deployment) if p != old]
        if pids:
            return pids[0]
        time.sleep(0.5)
    raise AssertionError(f"{deployment}: no replacement replica after {timeout_s} s")


def _queries(index_dir: Path) -> list[tuple[dict, dict]]:
    index = open_gallery(index_dir)[Modality.IMAGE]
    record = index.get(index.ids[0])
    image, audio = Path(record["image_path"]).read_bytes(), Path(record["audio_path"]).read_bytes()
    return [
        ({"text": record["caption"]}, {}),
        ({}, {"audio": ("q.wav", audio, "audio/wav")}),
        ({}, {"image": ("q.png", image, "image/png")}),
    ]


async def _load(url: str, queries: list[tuple[dict, dict]], kills: tuple[str, ...]) -> tuple[list, dict, dict]:
    """8 clients search until every deployment in `kills` was killed and replaced; returns the outcomes, the killed
    pids and their replacements."""
    outcomes: list[tuple[int, bool, int]] = []  # (status, retried, query kind)
    killed: dict[str, int] = {}
    replaced: dict[str, int] = {}
    done = asyncio.Event()
    start = time.monotonic()

    async def worker(n: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            i = n
            while not done.is_set():
                data, files = queries[i % len(queries)]
                r = await client.post("/search", data={"target": "image", "k": "10", **data}, files=files)
                outcomes.append((r.status_code, r.headers.get("x-cman-retried") == "1", i % len(queries)))
                i += 1

    async def answered(n: int) -> None:
        while len(outcomes) < n:
            assert time.monotonic() - start < LOAD_TIMEOUT_S, f"{len(outcomes)} answers in {LOAD_TIMEOUT_S:.0f} s"
            await asyncio.sleep(0.05)

    async def kill(deployment: str) -> None:
        await answered(len(outcomes) + STEADY)
        (pid,) = replica_pids(deployment)
        os.kill(pid, signal.SIGKILL)
        killed[deployment] = pid
        replaced[deployment] = await asyncio.to_thread(wait_replaced, deployment, pid)

    async def killer() -> None:
        try:
            for deployment in kills:
                await kill(deployment)
            # A kill interrupts only the requests in flight at that replica at that instant: on a busy box both
            # kills can land between requests (0 retried in a full-suite run, 2026-12-07). Kill the last one again,
            # at most twice more, until the retry path was taken, so that the test always exercises it.
            for _ in range(2):
                if any(retried for _, retried, _ in outcomes):
                    break
                await kill(kills[-1])
            await answered(len(outcomes) + STEADY)
        finally:
            done.set()

    await asyncio.gather(killer(), *(worker(n) for n in range(CONCURRENCY)))
    return outcomes, killed, replaced


def _top10(client: httpx.Client, queries) -> list[list[str]]:
    out = []
    for data, files in queries:
        r = client.post("/search", data={"target": "image", "k": "10", **data}, files=files)
        assert r.status_code == 200, r.text
        out.append([hit["id"] for hit in r.json()["results"]])
    return out


def test_replicas_killed_under_load_are_replaced_and_requests_succeed(served_app: dict) -> None:
    queries = _queries(served_app["index_dir"])
    with httpx.Client(base_url=served_app["url"], timeout=120) as client:
        before = _top10(client, queries)
        outcomes, killed, replaced = asyncio.run(_load(served_app["url"], queries, KILLS))
        after = _top10(client, queries)
    statuses = [s for s, _, _ in outcomes]
    ok = sum(200 <= s < 300 for s in statuses)
    unretried_5xx = [(s, kind) for s, retried, kind in outcomes if s >= 500 and not retried]
    retried = sum(r for _, r, _ in outcomes)
    print(f"\n{len(statuses)} requests: {ok} 2xx, {retried} retried, killed {killed} → {replaced}")
    assert set(killed) == set(KILLS)
    assert ok / len(statuses) >= 0.99, sorted(set(statuses))
    assert not unretried_5xx, unretried_5xx
    assert retried >= 1, "killing the Retriever under load interrupted no request: the retry path went untested"
    assert {kind for _, _, kind in outcomes} == {0, 1, 2}
    assert all(replaced[d] != killed[d] for d in killed)
    assert after == before


def _dies(times: int):
    """A deployment call whose replica dies `times` times in a row, then answers; and the list of its attempts."""
    from ray.exceptions import RayActorError

    attempts: list[int] = []

    async def make() -> dict:
        attempts.append(len(attempts))
        if len(attempts) <= times:
            raise RayActorError()
        return {"ok": True}

    return make, attempts


def test_a_dead_replica_is_retried_with_backoff_within_the_request_timeout(monkeypatch) -> None:
    """stop 21: one retry 1.5 s after a death still met the dead replica for 4 of 164 requests on a loaded box."""
    from serve_app import calls

    monkeypatch.setattr(calls, "RETRY_DELAYS_S", (0.01, 0.02, 0.04))
    make, attempts = _dies(2)
    state: dict = {}
    assert asyncio.run(calls.call(make, timeout_s=5, idempotent=True, state=state)) == {"ok": True}
    assert len(attempts) == 3 and state == {"retried": True}

    make, attempts = _dies(9)  # dies more often than there are delays: 503, saying how often it was retried
    with pytest.raises(calls.ServiceUnavailable, match="retried 3 times") as err:
        asyncio.run(calls.call(make, timeout_s=5, idempotent=True))
    assert err.value.status == 503 and len(attempts) == 4

    monkeypatch.setattr(calls, "RETRY_DELAYS_S", (10.0,))  # a wait past the request's timeout is not started
    make, attempts = _dies(1)
    started = time.monotonic()
    with pytest.raises(calls.ServiceUnavailable, match="retried 0 times"):
        asyncio.run(calls.call(make, timeout_s=1, idempotent=True))
    assert len(attempts) == 1 and time.monotonic() - started < 5  # the 10 s wait was never started

    make, attempts = _dies(1)  # a state-changing call is never retried
    with pytest.raises(calls.ServiceUnavailable, match="not retried"):
        asyncio.run(calls.call(make, timeout_s=5, idempotent=False))
    assert len(attempts) == 1


def _peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024


def _bombs() -> dict[str, bytes]:
    import io
    import struct

    rate_bomb = bytearray(wav(6.0))  # 192 KB of 16 kHz PCM relabelled as 1 Hz: ~1.6e9 samples if resampled whole
    struct.pack_into("<II", rate_bomb, 24, 1, 2)
    hour = io.BytesIO()
    sf.write(hour, np.zeros(3600 * 16000, dtype=np.int16), 16000, format="FLAC")  # ~470 MB decoded, ~180 KB here
    fast = io.BytesIO()
    sf.write(fast, np.zeros(8 * 384_000, dtype=np.int16), 384_000, format="FLAC")  # 8 s at 384 kHz: kept, resampled
    return {"rate": bytes(rate_bomb), "hour": hour.getvalue(), "fast": fast.getvalue()}


def test_audio_bombs_are_refused_or_cut_in_bounded_memory(served_app: dict) -> None:
    from ray import serve

    (pid,) = replica_pids("AudioEncoder")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak RSS counter (VmHWM) to the current RSS
    base = _peak_rss_mib(pid)
    bombs = _bombs()
    handle = serve.get_deployment_handle("AudioEncoder", SERVE_APP)
    direct = {name: handle.encode.remote(data).result(timeout_s=60) for name, data in bombs.items()}
    assert direct["rate"]["status"] == 415 and "1 Hz" in direct["rate"]["error"]
    assert direct["hour"]["status"] == 413 and "max_audio_seconds" in direct["hour"]["error"]
    assert "tokens" in direct["fast"], direct["fast"]
    with httpx.Client(base_url=served_app["url"], timeout=120) as client:
        for name, status in (("rate", 415), ("hour", 413), ("fast", 200)):
            files = {"audio": (f"{name}.flac", bombs[name], "audio/flac")}
            r = client.post("/search", data={"target": "image"}, files=files)
            assert r.status_code == status, (name, r.text)
        growth = _peak_rss_mib(pid) - base
        print(f"\naudio replica peak RSS growth over the bombs: {growth:.1f} MiB")
        assert growth < 200
        good = client.post("/search", data={"target": "text"}, files={"audio": ("a.wav", wav(1.0), "audio/wav")})
        assert good.status_code == 200 and replica_pids("AudioEncoder") == [pid]


def test_each_encoder_replica_holds_only_its_own_encoder(served_app: dict, trained_checkpoint: Path) -> None:
    from ray import serve

    from cman.modality import Modality
    from cman.models.cman import CMAN, count_parameters
    from serve_app.encoders import DEPLOYMENT_NAMES

    full = CMAN.from_pretrained(trained_checkpoint).merge_adapters()
    total = count_parameters(full)[1]
    for modality in Modality:
        info = serve.get_deployment_handle(DEPLOYMENT_NAMES[modality], SERVE_APP).info.remote().result(timeout_s=60)
        own = count_parameters(full.encoders[modality.value])[1]
        assert info["modality"] == modality.value and info["parameters"] == own < total

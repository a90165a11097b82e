#!/usr/bin/env python
"""CI step: the README's first command as a new user runs it, judged in a real browser.

    .venv/bin/python .ci/demo_page_check.py [--output-dir DIR] [--port 8000] [--queries 8]

Runs `cman quickstart` (the embedded demo: data, a 2-trial sweep, index, Ray Serve) from scratch, waits for its
HTTP service, then drives the demo page in headless Debian chromium (playwright): for `--queries` attribute
combinations that are in the gallery (the test split, spread over sizes, colours, shapes and positions) it types
"a <size> <colour> <shape> <where>", searches images, and requires the first result to have exactly those four
attributes. Prints one JSON line (time to serve, each query and its first result) and exits 1 on any miss.
The full quickstart takes ~8-9 minutes on 2 cores, which is why this runs in CI (.ci/run) and not in `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHERE = {"left": "on the left", "center": "in the middle", "right": "on the right"}
SERVE_TIMEOUT_S = 1800


def wait_for_service(proc: subprocess.Popen, url: str, log: Path) -> float:
    start = time.monotonic()
    while time.monotonic() - start < SERVE_TIMEOUT_S:
        if proc.poll() is not None:
            sys.exit(f"cman quickstart exited with {proc.returncode} before serving:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as answer:
                if answer.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(2)
    sys.exit(f"no answer from {url}/healthz after {SERVE_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def pick_queries(metadata: Path, n: int) -> list[dict[str, str]]:
    """`n` gallery groups spread over the sorted list of the test split's groups (deterministic)."""
    groups = sorted({item["group"] for item in json.loads(metadata.read_text())})
    chosen = [groups[round(i * (len(groups) - 1) / max(n - 1, 1))] for i in range(n)]
    queries = []
    for group in dict.fromkeys(chosen):
        size, colour, shape, position = group.split("-")
        queries.append({"group": group, "text": f"a {size} {colour} {shape} {WHERE[position]}"})
    return queries


def ask_in_browser(url: str, queries: list[dict[str, str]], groups: dict[str, str], shot: Path) -> list[dict]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    answers = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(url + "/")
        for query in queries:
            page.evaluate("document.body.dataset.state = ''")
            page.fill("#text", query["text"])
            page.select_option("#target", "image")
            page.fill("#k", "3")
            page.click("#search")
            page.wait_for_selector("body[data-state=done]", timeout=60_000)
            meta = page.locator("#results .card .meta").first.inner_text()
            first = re.match(r"\s*(\S+)", meta).group(1)
            answers.append({**query, "first": first, "first_group": groups.get(first, "?")})
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    return answers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", help="quickstart output (default: a new temporary folder)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--queries", type=int, default=8)
    args = parser.parse_args()
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="cman-demo-check-"))
    log = out.parent / f"{out.name}.log"
    url = f"http://127.0.0.1:{args.port}"
    cman = Path(sys.executable).with_name("cman")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [str(cman), "quickstart", "--output-dir", str(out), "--port", str(args.port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        served_after = wait_for_service(proc, url, log)
        metadata = out / "data" / "metadata" / "test_metadata.json"
        groups = {item["id"]: item["group"] for item in json.loads(metadata.read_text())}
        answers = ask_in_browser(url, pick_queries(metadata, args.queries), groups, out.parent / "demo_check.png")
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: Serve and Ray shut down
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    missed = [a for a in answers if a["first_group"] != a["group"]]
    print(json.dumps({"served_after_s": round(served_after, 1), "answers": answers, "missed": len(missed)}))
    lines = log.read_text().splitlines()
    done = [line for line in lines if line.startswith("quickstart: ")]
    table = [line for line in lines if re.match(r"(text|audio|image)->|rsum ", line)]
    print("\n".join(done + table[-7:]))
    if missed:
        print(f"demo page: {len(missed)} of {len(answers)} typed queries got a first result with other attributes")
        return 1
    print(f"demo page: all {len(answers)} typed queries got an item with exactly their attributes first")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""scripts/screenshot's Python part: docs/status-page.png, the status page as a headless chromium
shows it, serving the shipped models under some traffic, with a digit drawn on its pad.

The traffic is load_digits' own samples (so drift stays in distribution) from a few clients, in
requests of 1 to 8 rows, at a rate that rises and falls so the charts have a shape.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.service: the browser driver and the test server

from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.service.browser import find_chromium, launched  # noqa: E402
from tests.service.conftest import serve  # noqa: E402
from tests.service.test_status_page import SEVEN, draw  # noqa: E402

MAX_BYTES = 300 * 1024


def traffic(base: str, stop: threading.Event, seed: int) -> None:
    rows = load_digits().data.astype(float)
    rng = np.random.default_rng(seed)
    started = time.monotonic()
    with httpx.Client(base_url=base) as client:
        while not stop.is_set():
            name = "digits-mlp" if rng.random() < 0.7 else "digits-cnn"
            pick = rng.choice(len(rows), size=int(rng.integers(1, 9)))
            client.post(f"/models/{name}/predict", json={"inputs": rows[pick].tolist()})
            # 20 to 100 requests/s per client, in a slow wave
            wave = 0.5 + 0.5 * math.sin((time.monotonic() - started) / 4)
            time.sleep(1 / (20 + 80 * wave))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "status-page.png")
    parser.add_argument("--seconds", type=float, default=30.0, help="traffic before the shot")
    args = parser.parse_args()
    chromium = find_chromium()
    if chromium is None:
        print("no chromium on PATH: apt-get install chromium", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        shutil.copytree(ROOT / "model_store", store)
        settings = Settings(model_store=store, default_model="digits-mlp")
        with serve(create_app(settings)) as base, launched(chromium) as browser:
            stop = threading.Event()
            clients = [
                threading.Thread(target=traffic, args=(base, stop, seed)) for seed in range(4)
            ]
            for client in clients:
                client.start()
            try:
                page = browser.new_page(1280, 1000)
                page.goto(f"{base}/?every_ms=500")
                time.sleep(args.seconds)
                page.wait_for("document.querySelectorAll('#drift [data-drift]').length === 2")
                draw(page, SEVEN)
                page.evaluate("window.scrollTo(0, 0)")
                time.sleep(1)
                page.screenshot(args.out)
                errors = page.errors()
            finally:
                stop.set()
                for client in clients:
                    client.join()
    size = args.out.stat().st_size
    print(f"{args.out}: {size / 1024:.0f} KiB")
    for error in errors:
        print(f"browser: {error}", file=sys.stderr)
    if size > MAX_BYTES:
        print(f"over {MAX_BYTES // 1024} KiB: too big for the README", file=sys.stderr)
        return 1
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""A headless chromium driven over the Chrome DevTools Protocol: just what the status page's test
and its screenshot need (navigate, evaluate, real mouse input, screenshots, console errors).

The protocol is JSON over one websocket (``websockets``' synchronous client); no Playwright, so
nothing is downloaded: Debian's ``chromium`` package is the browser.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The browser's executable on PATH, or None."""
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


class BrowserError(AssertionError):
    pass


class Page:
    """One tab, attached in flattened mode: its commands carry its session id."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session
        self.events: list[dict[str, Any]] = []  # every event of this tab, in order

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        return self.browser.send(method, params, session=self.session)

    def goto(self, url: str, timeout: float = 15.0) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'", timeout)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited), as JSON gives it back."""
        result = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"{expression!r} threw: {text}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15.0) -> Any:
        """Poll ``expression`` until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"still false after {timeout:g} s: {expression}")
            time.sleep(0.05)

    def box_of(self, selector: str) -> tuple[float, float, float, float]:
        """(left, top, width, height) of an element scrolled into view, in CSS pixels."""
        # NOTE: two frames after the scroll: touches are hit-tested by the compositor, which
        # learns the new scroll offset only with a frame (mouse events are hit on the main thread).
        box = self.evaluate(
            f"(async () => {{ const e = document.querySelector({json.dumps(selector)}); "
            "e.scrollIntoView({block: 'center', behavior: 'instant'}); "
            "for (let i = 0; i < 2; i++) await new Promise(requestAnimationFrame); "
            "const r = e.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; })()"
        )
        return box[0], box[1], box[2], box[3]

    def drag(self, selector: str, points: Sequence[tuple[float, float]]) -> None:
        """A real mouse stroke through ``points`` given in 0..1 of the element's box: pressed at
        the first, moved through each, released at the last (the browser makes pointer events)."""
        left, top, width, height = self.box_of(selector)
        at = [(left + x * width, top + y * height) for x, y in points]
        mouse = {"button": "left", "clickCount": 1}
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=at[0][0], y=at[0][1])
        self.send("Input.dispatchMouseEvent", type="mousePressed", x=at[0][0], y=at[0][1], **mouse)
        for x, y in at[1:]:
            self.send(
                "Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y, buttons=1, button="left"
            )
        x, y = at[-1]
        self.send("Input.dispatchMouseEvent", type="mouseReleased", x=x, y=y, **mouse)

    def touch(self, selector: str, points: Sequence[tuple[float, float]]) -> None:
        """The same stroke as ``drag``, with one finger (a page opened with ``touch=True``)."""
        left, top, width, height = self.box_of(selector)
        at = [{"x": left + x * width, "y": top + y * height} for x, y in points]
        self.send("Input.dispatchTouchEvent", type="touchStart", touchPoints=[at[0]])
        for point in at[1:]:
            self.send("Input.dispatchTouchEvent", type="touchMove", touchPoints=[point])
        self.send("Input.dispatchTouchEvent", type="touchEnd", touchPoints=[])

    def type_into(self, selector: str, text: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.send("Input.insertText", text=text)

    def screenshot(self, path: Path) -> None:
        """The whole page as a PNG, not only the viewport."""
        width, height = self.evaluate(
            "[document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
        )
        shot = self.send(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
        )
        path.write_bytes(base64.b64decode(shot["data"]))

    def errors(self) -> list[str]:
        """Uncaught exceptions, console.error / console.assert calls, and the browser's own
        error entries (e.g. a failed resource load), as one line each."""
        found = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                description = details.get("exception", {}).get("description")
                found.append(f"uncaught: {description or details.get('text')}")
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                args = [a.get("value", a.get("description", "")) for a in params["args"]]
                found.append(f"console.{params['type']}: {' '.join(map(str, args))}")
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                found.append(f"{entry['source']}: {entry['text']} {entry.get('url', '')}".strip())
        return found


class Browser:
    """A headless chromium on a throwaway profile, and its DevTools websocket."""

    def __init__(self, executable: str, profile: Path, window: tuple[int, int]) -> None:
        args = [
            executable,
            "--headless=new",
            "--remote-debugging-port=0",  # any free port: written to DevToolsActivePort
            f"--user-data-dir={profile}",
            f"--window-size={window[0]},{window[1]}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-dev-shm-usage",  # containers give /dev/shm 64 MB
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            "about:blank",
        ]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # chromium refuses to run as root with its sandbox
        self._log = (profile / "chromium.log").open("wb")
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        self._ids = itertools.count(1)
        self._closing = contextlib.ExitStack()
        self._ws = self._closing.enter_context(self._connect(profile / "DevToolsActivePort"))
        self._pages: dict[str, Page] = {}

    def _connect(self, port_file: Path, timeout: float = 30.0) -> ClientConnection:
        deadline = time.monotonic() + timeout
        while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (port_file.parent / "chromium.log").read_text(errors="replace")[-2000:]
                raise BrowserError(f"chromium did not start its DevTools server:\n{log}")
            time.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        url = f"ws://127.0.0.1:{port}{path}"
        return connect(url, max_size=None, open_timeout=10, proxy=None)  # never a proxy

    def send(
        self, method: str, params: dict[str, Any], session: str | None = None, timeout: float = 30
    ) -> dict[str, Any]:
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        self._ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"no answer to {method} in {timeout:g} s")
            reply = json.loads(self._ws.recv(timeout=left))
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            page = self._pages.get(reply.get("sessionId", ""))
            if page is not None and "method" in reply:
                page.events.append(reply)

    def new_page(self, width: int = 1280, height: int = 900, *, touch: bool = False) -> Page:
        """A tab of ``width`` x ``height`` CSS pixels; ``touch``: a touch screen, as a phone's."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        page = Page(self, attached["sessionId"])
        self._pages[page.session] = page
        for domain in ("Page", "Runtime", "Log"):
            page.send(f"{domain}.enable")
        page.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        if touch:  # before the page loads: it asks once whether it has a touch screen
            page.send("Emulation.setTouchEmulationEnabled", enabled=True, maxTouchPoints=1)
        return page

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close", {}, timeout=5)
        with contextlib.suppress(Exception):
            self._closing.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@contextlib.contextmanager
def launched(executable: str, window: tuple[int, int] = (1280, 900)) -> Iterator[Browser]:
    with tempfile.TemporaryDirectory(prefix="foldserve-chromium-") as profile:
        browser = Browser(executable, Path(profile), window)
        try:
            yield browser
        finally:
            browser.close()

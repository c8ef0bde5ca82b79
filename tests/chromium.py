"""Headless Chromium driven over the DevTools protocol, for tests of the pages we write.

`load_pages(urls, out_dir)` opens each URL in one headless Chromium and reports
what a person would see go wrong: console errors, uncaught exceptions, failed
loads (any resource, or an HTTP status >= 400), plus every <img>'s natural
size and a full-page screenshot. The protocol is JSON over a websocket;
aiohttp (also a dependency of ray[default]) speaks it.

The browser is Debian's `chromium` package, or the binary named by $CHROMIUM.
A missing browser is an error, not a skip: `.ci/run` installs it.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--hide-scrollbars", "--mute-audio",
         "--window-size=1280,900", "--remote-debugging-port=0", "--remote-allow-origins=*")

# Every <img>: where it came from, whether it finished, its decoded size.
IMAGES_JS = """JSON.stringify([...document.images].map(i => ({src: i.currentSrc || i.src,
    complete: i.complete, width: i.naturalWidth, height: i.naturalHeight})))"""


def find_chromium() -> str:
    path = os.environ.get("CHROMIUM") or next(filter(None, map(shutil.which, NAMES)), None)
    if not path:
        raise FileNotFoundError("no Chromium: install Debian's chromium package (apt-get install chromium; "
                                ".ci/run does) or set CHROMIUM to a Chromium or Chrome binary")
    return path


@dataclass
class Page:
    url: str
    problems: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    images: list[dict[str, Any]] = field(default_factory=list)
    title: str = ""
    text: str = ""  # document.body.innerText
    scripts: int = 0  # <script> elements in the document
    screenshot: Path | None = None


def load_pages(urls: list[str], out_dir: Path, timeout: float = 60.0) -> list[Page]:
    """Open each URL in turn in one fresh headless Chromium; screenshots go to out_dir."""
    # Chromium's helper processes may still write to the profile as the browser
    # exits: the whole process group is stopped, and the profile's removal may
    # not fail the test over a file written at the last moment.
    with tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True) as profile:
        log = open(Path(profile) / "stderr.log", "wb")
        proc = subprocess.Popen([find_chromium(), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        try:
            endpoint = _devtools_endpoint(Path(profile), proc, timeout)
            return asyncio.run(asyncio.wait_for(_load_all(endpoint, urls, out_dir), timeout))
        finally:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            _signal_group(proc, signal.SIGKILL)  # helpers that outlived the browser
            log.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _devtools_endpoint(profile: Path, proc: subprocess.Popen, timeout: float) -> str:
    """Chromium writes its port and browser path to DevToolsActivePort when ready."""
    marker, deadline = profile / "DevToolsActivePort", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}: "
                               f"{(profile / 'stderr.log').read_text(errors='replace')[-2000:]}")
        lines = marker.read_text().split() if marker.exists() else []
        if len(lines) == 2:
            return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
        time.sleep(0.05)
    raise TimeoutError(f"chromium did not open its DevTools port in {timeout} s")


class _Session:
    """Commands and events over the browser's websocket (flat sessions)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws, self.ids = ws, itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.events: list[dict[str, Any]] = []
        self.event_seen = asyncio.Event()
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data:
                self.pending.pop(data["id"]).set_result(data)
            else:
                self.events.append(data)
                self.event_seen.set()

    async def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        i = next(self.ids)
        self.pending[i] = asyncio.get_running_loop().create_future()
        await self.ws.send_str(json.dumps({"id": i, "method": method, "params": params or {},
                                           **({"sessionId": session} if session else {})}))
        reply = await self.pending[i]
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    async def wait_for(self, method: str, session: str) -> dict:
        while True:
            for e in self.events:
                if e["method"] == method and e.get("sessionId") == session:
                    return e
            self.event_seen.clear()
            await self.event_seen.wait()


async def _load_all(endpoint: str, urls: list[str], out_dir: Path) -> list[Page]:
    async with aiohttp.ClientSession() as http, http.ws_connect(endpoint, max_msg_size=0) as ws:
        s = _Session(ws)
        pages = [await _load(s, url, out_dir / f"page-{n}.png") for n, url in enumerate(urls)]
        s.reader.cancel()
        return pages


async def _load(s: _Session, url: str, screenshot: Path) -> Page:
    target = (await s.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
    sid = (await s.send("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        await s.send(f"{domain}.enable", session=sid)
    first = len(s.events)
    nav = await s.send("Page.navigate", {"url": url}, session=sid)
    page = Page(url)
    if nav.get("errorText"):
        page.problems.append(f"navigation failed: {nav['errorText']}")
        return page
    await s.wait_for("Page.loadEventFired", sid)  # after every <img> loaded or failed

    async def evaluate(expr: str) -> Any:
        r = await s.send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=sid)
        return r["result"].get("value")

    page.images = json.loads(await evaluate(IMAGES_JS))
    page.title, page.text = await evaluate("document.title"), await evaluate("document.body.innerText")
    page.scripts = await evaluate("document.scripts.length")
    size = (await s.send("Page.getLayoutMetrics", session=sid))["cssContentSize"]
    shot = await s.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
        "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}}, session=sid)
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    page.screenshot = screenshot
    page.problems += _problems([e for e in s.events[first:] if e.get("sessionId") == sid])
    await s.send("Target.closeTarget", {"targetId": target})
    return page


def _problems(events: list[dict[str, Any]]) -> list[str]:
    out, urls = [], {}
    for e in events:
        if e["method"] == "Network.requestWillBeSent":
            urls[e["params"]["requestId"]] = e["params"]["request"]["url"]
        m, p = e["method"], e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            out.append(f"console.{p['type']}: " + " ".join(str(a.get("value", a.get("description")))
                                                         for a in p.get("args", [])))
        elif m == "Runtime.exceptionThrown":
            out.append(f"exception: {p['exceptionDetails'].get('text')} "
                       f"{p['exceptionDetails'].get('exception', {}).get('description', '')}")
        elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
            out.append(f"log ({p['entry']['source']}): {p['entry']['text']} {p['entry'].get('url', '')}")
        elif m == "Network.loadingFailed":
            out.append(f"failed to load {urls.get(p['requestId'], '?')}: {p.get('errorText')} "
                       f"{p.get('blockedReason', '')}".rstrip())
        elif m == "Network.responseReceived" and p["response"]["status"] >= 400:
            out.append(f"HTTP {p['response']['status']}: {p['response']['url']}")
    return out

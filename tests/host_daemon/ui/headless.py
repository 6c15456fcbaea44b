"""Debian's headless Chromium driven over the DevTools protocol (a websocket, with aiohttp).

Installs nothing: ``chromium_path()`` says why a test must skip when the browser is missing
(.ci/run apt-installs ``chromium``). Each browser gets a fresh ``--user-data-dir`` and is
killed with it at the end; ``--remote-debugging-port=0`` makes Chromium pick a free port and
write it to ``DevToolsActivePort`` in that folder, which is polled with a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-port=0"]


def chromium_path() -> tuple[str | None, str]:
    """(path, "") or (None, the reason to skip)."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path, ""
    return None, "Debian's chromium is not installed (apt-get install chromium; .ci/run does)"


class Browser:
    """One headless Chromium with one page; ``async with Browser(path) as page: ...``."""

    def __init__(self, binary: str, width: int = 1400, height: int = 1000) -> None:
        self.binary = binary
        self.size = (width, height)
        self.profile = Path(tempfile.mkdtemp(prefix="balloon-chromium-"))
        self.process: subprocess.Popen | None = None
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.session_id: str | None = None
        self.events: list[dict] = []
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> Browser:
        log = (self.profile / "chromium.log").open("wb")
        self.process = subprocess.Popen(
            [self.binary, *FLAGS, f"--user-data-dir={self.profile}",
             f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        port, path = await self._devtools_address(deadline=30)
        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        target = await self.send("Target.createTarget", {"url": "about:blank"}, browser=True)
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True},
                                   browser=True)
        self.session_id = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            await self.send(f"{domain}.enable")
        await self.send("Emulation.setDeviceMetricsOverride",
                        {"width": self.size[0], "height": self.size[1], "deviceScaleFactor": 1, "mobile": False})
        return self

    async def __aexit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.send("Browser.close", browser=True), 5)
        if self._reader:
            self._reader.cancel()
        if self.ws is not None:
            await self.ws.close()
        if self.http is not None:
            await self.http.close()
        if self.process is not None:
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)

    async def _devtools_address(self, deadline: float) -> tuple[int, str]:
        marker = self.profile / "DevToolsActivePort"
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise AssertionError(f"chromium exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, ValueError, IndexError):
                port, path = marker.read_text().split("\n")[:2]
                return int(port), path
            await asyncio.sleep(0.05)
        raise AssertionError(f"chromium wrote no DevToolsActivePort in {deadline}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.profile / "chromium.log").read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def _read(self) -> None:
        async for message in self.ws:
            data = json.loads(message.data)
            future = self._waiting.pop(data.get("id"), None)
            if future is not None and not future.done():
                future.set_result(data)
            elif "method" in data:
                self.events.append(data)

    async def send(self, method: str, params: dict | None = None, browser: bool = False) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if not browser:
            message["sessionId"] = self.session_id
        future = asyncio.get_running_loop().create_future()
        self._waiting[self._next_id] = future
        await self.ws.send_str(json.dumps(message))
        reply = await asyncio.wait_for(future, 30)
        if "error" in reply:
            raise AssertionError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def goto(self, url: str, deadline: float = 30) -> None:
        """Navigate and wait for the load event (scripts ran, first fetches started)."""
        seen = len(self.events)
        reply = await self.send("Page.navigate", {"url": url})
        if reply.get("errorText"):
            raise AssertionError(f"{url}: {reply['errorText']}")
        end = time.monotonic() + deadline
        while not any(e["method"] == "Page.loadEventFired" for e in self.events[seen:]):
            if time.monotonic() > end:
                raise AssertionError(f"{url} did not load in {deadline}s")
            await asyncio.sleep(0.05)

    async def evaluate(self, expression: str):
        """The JSON value of a page expression (promises awaited); page exceptions fail the test."""
        result = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                      "awaitPromise": True})
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, deadline: float, what: str):
        """Poll a page expression until it is truthy; fail with ``what`` and the page's status."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.2)
        status = await self.evaluate("document.getElementById('status')?.textContent")
        raise AssertionError(f"timed out after {deadline}s waiting for {what} (page status: {status!r})")

    async def screenshot(self, path: Path) -> None:
        height = await self.evaluate("document.documentElement.scrollHeight")
        await self.send("Emulation.setDeviceMetricsOverride",
                        {"width": self.size[0], "height": int(height), "deviceScaleFactor": 1, "mobile": False})
        shot = await self.send("Page.captureScreenshot", {"format": "png"})
        path.write_bytes(base64.b64decode(shot["data"]))

    def errors(self) -> list[str]:
        """Uncaught exceptions, console errors and failed loads the page has had so far."""
        found = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails'].get('text')} "
                             f"{params['exceptionDetails'].get('exception', {}).get('description', '')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append("console.error: " + " ".join(str(a.get("value", a.get("description")))
                                                          for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        return found

    def requested_urls(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

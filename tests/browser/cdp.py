"""A small Chrome DevTools Protocol client: headless Chromium, one page, no Playwright.

    with Browser.launch() as browser:
        page = browser.new_page(width=1280, height=800)
        page.goto("http://127.0.0.1:8000/#/")
        page.wait_for("document.body.dataset.ready === 'atlas'")
        print(page.eval("document.title"))

Also a static file server for an atlas (`serve`), started from the command template in
LOUPE_VIEWER_SERVE (placeholders `{dir}` and `{port}`), else Python's http.server.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import websocket  # websocket-client

DEFAULT_SERVE = "python3 -m http.server {port} --bind 127.0.0.1 --directory {dir}"


class CDPError(RuntimeError):
    pass


def find_chromium() -> str | None:
    """The Chromium binary: $CHROMIUM, else the first of the usual names on PATH."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """Headless Chromium, driven over the browser-level DevTools websocket."""

    def __init__(self, proc: subprocess.Popen, profile: str, ws_url: str):
        self.proc = proc
        self.profile = profile
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.ids = itertools.count(1)
        self.events: list[dict] = []
        self.pages: list[Page] = []

    @classmethod
    def launch(cls, binary: str | None = None, timeout: float = 60.0) -> "Browser":
        binary = binary or find_chromium()
        if not binary:
            raise CDPError("no Chromium found (apt-get install -y chromium, or set $CHROMIUM)")
        profile = tempfile.mkdtemp(prefix="loupe-cdp-")
        args = [
            binary,
            "--headless=new",
            "--no-sandbox",  # root in a container has no user namespace sandbox
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--metrics-recording-only",
            "--mute-audio",
            "--hide-scrollbars",
            "--force-color-profile=srgb",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
        ]
        # stderr to a file, not a pipe: a pipe nobody reads fills up and blocks Chromium.
        log = open(Path(profile) / "chromium.log", "wb")
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
        log.close()
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while True:
            if port_file.exists():
                lines = port_file.read_text().splitlines()
                if len(lines) >= 2:
                    break
            if proc.poll() is not None:
                err = (Path(profile) / "chromium.log").read_text(errors="replace")
                shutil.rmtree(profile, ignore_errors=True)
                raise CDPError(f"Chromium exited with {proc.returncode}: {err[-2000:]}")
            if time.monotonic() > deadline:
                proc.kill()
                shutil.rmtree(profile, ignore_errors=True)
                raise CDPError("Chromium did not open its DevTools port")
            time.sleep(0.05)
        port, path = lines[0].strip(), lines[1].strip()
        return cls(proc, profile, f"ws://127.0.0.1:{port}{path}")

    # One websocket for the browser and every page (flattened sessions).
    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60.0) -> dict:
        msg_id = next(self.ids)
        msg = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CDPError(f"{method}: no answer in {timeout} s")
            self.ws.settimeout(remaining)
            reply = json.loads(self.ws.recv())
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise CDPError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self._event(reply)

    def pump(self, seconds: float) -> None:
        """Reads events for a while (console messages, exceptions, requests)."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self.ws.settimeout(remaining)
            try:
                reply = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                return
            if "method" in reply:
                self._event(reply)

    def _event(self, event: dict) -> None:
        self.events.append(event)
        for page in self.pages:
            if event.get("sessionId") == page.session:
                page.on_event(event)

    def new_page(self, width: int = 1280, height: int = 800, scale: float = 1.0) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, target, session)
        self.pages.append(page)
        page.send("Page.enable")
        page.send("Runtime.enable")
        page.send("Network.enable")
        page.send("Log.enable")
        page.resize(width, height, scale)
        return page

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close", timeout=5)
        with contextlib.suppress(Exception):
            self.ws.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    def __init__(self, browser: Browser, target: str, session: str):
        self.browser = browser
        self.target = target
        self.session = session
        self.requests: list[str] = []  # every URL the page asked for
        self.failed: list[tuple[str, int]] = []  # (url, status) of answers >= 400
        self.exceptions: list[str] = []  # uncaught JavaScript exceptions
        self.console_errors: list[str] = []
        self._loaded = False

    def on_event(self, event: dict) -> None:
        method, params = event["method"], event.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Network.responseReceived":
            status = params["response"]["status"]
            if status >= 400:
                self.failed.append((params["response"]["url"], status))
        elif method == "Runtime.exceptionThrown":
            d = params["exceptionDetails"]
            self.exceptions.append(d.get("exception", {}).get("description") or d.get("text", "exception"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.console_errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Page.loadEventFired":
            self._loaded = True

    def send(self, method: str, params: dict | None = None, timeout: float = 60.0) -> dict:
        return self.browser.send(method, params, session=self.session, timeout=timeout)

    def resize(self, width: int, height: int, scale: float = 1.0, mobile: bool = False) -> None:
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": mobile},
        )

    def goto(self, url: str, timeout: float = 60.0) -> None:
        self._loaded = False
        result = self.send("Page.navigate", {"url": url})
        if "errorText" in result:
            raise CDPError(f"{url}: {result['errorText']}")
        if "loaderId" not in result:
            return  # only the fragment changed: a same-document navigation, no load event
        deadline = time.monotonic() + timeout
        while not self._loaded:
            if time.monotonic() > deadline:
                raise CDPError(f"{url}: no load event in {timeout} s")
            self.browser.pump(0.05)

    def eval(self, expression: str, timeout: float = 60.0):
        """Evaluates an expression (promises awaited) and returns its value as JSON."""
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            d = result["exceptionDetails"]
            raise CDPError(f"{expression!r}: {d.get('exception', {}).get('description') or d.get('text')}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, interval: float = 0.05):
        """Waits until an expression is truthy and returns its value. The deadline is
        generous: the browser tests must pass on a loaded 2-core machine."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            last = self.eval(f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()")
            if last:
                return last
            if time.monotonic() > deadline:
                raise CDPError(f"timed out after {timeout} s waiting for {expression!r} (last value {last!r})")
            self.browser.pump(interval)

    def press(self, key: str) -> None:
        """Presses and releases a named key (ArrowLeft, ArrowRight, Enter, ...)."""
        codes = {"ArrowLeft": 37, "ArrowUp": 38, "ArrowRight": 39, "ArrowDown": 40, "Enter": 13, "Escape": 27}
        common = {"key": key, "code": key, "windowsVirtualKeyCode": codes.get(key, 0)}
        self.send("Input.dispatchKeyEvent", {"type": "rawKeyDown", **common})
        self.send("Input.dispatchKeyEvent", {"type": "keyUp", **common})

    def screenshot(self, path: str | os.PathLike, full_page: bool = False) -> None:
        params: dict = {"format": "png", "captureBeyondViewport": full_page}
        data = self.send("Page.captureScreenshot", params)["data"]
        Path(path).write_bytes(base64.b64decode(data))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(directory: str | os.PathLike, cwd: str | os.PathLike | None = None, timeout: float = 60.0):
    """Serves `directory` over HTTP on 127.0.0.1; yields the base URL (with a final /).

    The command comes from $LOUPE_VIEWER_SERVE, a template with `{dir}` and `{port}`
    (for example `target/release/loupe serve {dir} --listen 127.0.0.1:{port}`), split
    like a shell would and run without one, from `cwd`. Unset, it is Python's http.server.
    """
    template = os.environ.get("LOUPE_VIEWER_SERVE") or DEFAULT_SERVE
    port = free_port()
    argv = [a.format(dir=str(directory), port=port) for a in shlex.split(template)]
    base = f"http://127.0.0.1:{port}/"
    # The server's log goes to a file: a pipe nobody reads fills up and blocks the server.
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                err = log.read().decode(errors="replace")
                raise RuntimeError(f"server {argv} exited with {proc.returncode}: {err[-2000:]}")
            try:
                with urllib.request.urlopen(base, timeout=2):
                    break
            except urllib.error.HTTPError:
                break  # an answer, if not a page: the server is up
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {argv} did not answer {base} in {timeout} s")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()

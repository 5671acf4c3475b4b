"""The search page in a real headless Chromium: type a query, see the results, click one and watch it play
from the hit's moment; "more like this", a picture dropped on the page, one result per video with its timeline.

Chromium is driven through the DevTools protocol over `--remote-debugging-pipe` (JSON messages separated by NUL
on file descriptors 3 and 4), so no websocket client or webdriver is needed. Skipped, with the reason, when no
Chromium is installed (Debian: `apt-get install chromium`). With STANVID_SCREENSHOT=path the page is saved as a
PNG after the search (that is how docs/search.png is made).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from indexkit import save_tiny_model  # noqa: E402
from stanvid.search.index import build_index, open_index  # noqa: E402
from stanvid.search.server.app import create_app  # noqa: E402
from videogen import codec_available, make_frames, write_video  # noqa: E402

pytestmark = pytest.mark.browser

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# the flags the sandboxed CI needs: no sandbox or GPU, nothing that phones home, a fresh profile (added below)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--mute-audio",
    "--autoplay-policy=no-user-gesture-required",
    "--hide-scrollbars",
    "--window-size=1280,860",
]


def find_chromium() -> str | None:
    env = os.environ.get("STANVID_CHROMIUM")
    if env:
        return env
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


class DevTools:
    """A minimal Chrome DevTools protocol client over `--remote-debugging-pipe`."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Chromium reads commands from fd 3 and writes replies to fd 4: a small Python trampoline puts our pipe
        # ends there and execs the browser (a shell cannot: dash only redirects descriptors 0-9)
        argv = [
            binary,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        trampoline = (
            "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
            "os.execv(sys.argv[3], sys.argv[3:])"
        )
        self.log = profile.with_suffix(".log")  # a file, not a pipe: Chromium logs a lot and must never block
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", trampoline, str(to_chrome_r), str(from_chrome_w), *argv],
                pass_fds=(to_chrome_r, from_chrome_w),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next_id = 0
        self._messages: queue.Queue = queue.Queue()
        self._replies: dict[int, dict] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session: str | None = None

    def _read(self) -> None:
        buffer = b""
        while True:
            data = os.read(self._from_chrome, 1 << 16)
            if not data:
                self._messages.put(None)
                return
            buffer += data
            *complete, buffer = buffer.split(b"\0")
            for raw in complete:
                self._messages.put(json.loads(raw))

    def send(
        self, method: str, params: dict | None = None, timeout: float = 30.0, session: bool = True
    ) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while self._next_id not in self._replies:
            try:
                incoming = self._messages.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no reply to {method} within {timeout} s") from None
            if incoming is None:
                raise RuntimeError(f"chromium exited: {self.log.read_text(errors='replace')[-2000:]}")
            if "id" in incoming:
                self._replies[incoming["id"]] = incoming
        reply = self._replies.pop(self._next_id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def open_page(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send(
            "Target.attachToTarget", {"targetId": target, "flatten": True}, session=False
        )["sessionId"]
        self.send("Page.enable")
        self.send("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete' && !!document.getElementById('query')")

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"still false after {timeout} s: {expression}")

    def type_text(self, text: str) -> None:
        for char in text:  # one key event per character, as a person types
            self.send("Input.dispatchKeyEvent", {"type": "char", "text": char})

    def press_enter(self) -> None:
        key = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13}
        self.send("Input.dispatchKeyEvent", {"type": "keyDown", "text": "\r", **key})
        self.send("Input.dispatchKeyEvent", {"type": "keyUp", **key})

    def click(self, selector: str) -> None:
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView(); "
            "const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": box[0], "y": box[1], "button": "left", "clickCount": 1},
            )

    def screenshot(self, path: Path) -> None:
        """The whole page as a PNG (beyond the window when it is taller)."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        data = self.send(
            "Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True}
        )
        path.write_bytes(base64.b64decode(data["data"]))

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False, timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)


class LiveServer:
    """uvicorn serving an app on a free local port, in a thread."""

    def __init__(self, app) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def chromium(tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip(
            "no Chromium found (looked for chromium, chromium-browser, google-chrome; set STANVID_CHROMIUM "
            "or `apt-get install chromium`)"
        )
    tools = DevTools(binary, tmp_path / "profile")
    yield tools
    tools.close()


def test_type_a_query_see_results_and_play_from_the_hit(tmp_path, chromium):
    model_dir = save_tiny_model(tmp_path / "model")
    root = tmp_path / "my videos"
    root.mkdir()
    codec, ext = (
        ("vp9", "webm") if codec_available("vp9") else ("h264", "mp4")
    )  # VP9: every Chromium plays it
    for i, name in enumerate(("beach", "kitchen", "street")):
        write_video(root / f"{name}.{ext}", make_frames(30, 144, 256, seed=i), fps=10, codec=codec, gop=10)
    out = tmp_path / "idx"
    build_index(root, out, model_dir, segment_seconds=1.0, num_workers=0, progress=False)
    query = "a dog runs on the beach"
    expected = open_index(out).search(query, 20)

    with LiveServer(create_app(out)) as url:
        chromium.open_page(url + "/")
        chromium.evaluate("document.getElementById('query').focus()")
        chromium.type_text(query)
        assert chromium.evaluate("document.getElementById('query').value") == query
        chromium.press_enter()
        chromium.wait_for(f"document.querySelectorAll('#results .result').length === {len(expected)}")
        shown = chromium.evaluate(
            "[...document.querySelectorAll('#results .result')].map(li => ({id: Number(li.dataset.id), "
            "path: li.querySelector('.path').textContent, times: li.querySelector('.times').textContent}))"
        )
        assert [s["id"] for s in shown] == [h.id for h in expected]
        assert [s["path"] for s in shown] == [h.relpath for h in expected]
        assert "results for" in chromium.evaluate("document.getElementById('status').textContent")
        # the thumbnails in view were fetched and decoded
        chromium.wait_for(
            "[...document.querySelectorAll('#results img')].slice(0, 4)"
            ".every(img => img.complete && img.naturalWidth > 0)"
        )
        # click a hit that starts inside its video: the player loads it (range requests) and seeks there
        rank = next(i for i, h in enumerate(expected) if h.start > 0)
        hit = expected[rank]
        chromium.click(f"#results .result:nth-child({rank + 1})")
        chromium.wait_for("!document.getElementById('player').hidden")
        state = chromium.wait_for(
            "(() => { const v = document.getElementById('video'); "
            f"return v.readyState >= 2 && v.currentTime >= {hit.start - 0.01} "
            "? {src: v.currentSrc, time: v.currentTime, error: v.error && v.error.code} : null; })()"
        )
        assert state["src"] == f"{url}/api/video/{hit.file_id}" and state["error"] is None
        assert hit.start - 0.01 <= state["time"] <= hit.end + 1.0
        assert hit.relpath in chromium.evaluate("document.getElementById('now-playing').textContent")
        if os.environ.get("STANVID_SCREENSHOT"):
            chromium.evaluate(
                "(() => { const v = document.getElementById('video'); v.pause(); "
                f"v.currentTime = {hit.start + 0.5}; window.scrollTo(0, 0); }})()"
            )
            chromium.wait_for(
                "document.getElementById('video').readyState >= 2 && !document.getElementById('video').seeking"
            )
            chromium.screenshot(Path(os.environ["STANVID_SCREENSHOT"]))

        # an error from the API is shown on the page, not swallowed
        chromium.evaluate("document.getElementById('query').value = 'x'.repeat(600)")
        chromium.click("#search-button")
        chromium.wait_for("document.getElementById('status').classList.contains('error')")
        assert "at most" in chromium.evaluate("document.getElementById('status').textContent")


def test_more_like_this_image_drop_and_moments(tmp_path, chromium):
    """ "More like this" on a hit, a picture dropped on the page, and one result per video with its timeline."""
    import httpx

    model_dir = save_tiny_model(tmp_path / "model")
    root = tmp_path / "videos"
    root.mkdir()
    for i, name in enumerate(("beach", "kitchen", "street")):
        write_video(root / f"{name}.mp4", make_frames(30, 72, 128, seed=i), fps=10, codec="h264", gop=10)
    out = tmp_path / "idx"
    build_index(root, out, model_dir, segment_seconds=1.0, num_workers=0, progress=False)
    index = open_index(out)
    query = "a dog runs on the beach"
    first = index.search(query, 10)

    with LiveServer(create_app(out)) as url:
        chromium.open_page(url + "/")
        chromium.evaluate(f"document.getElementById('query').value = {json.dumps(query)}")
        chromium.click("#search-button")
        chromium.wait_for(f"document.querySelectorAll('#results .result').length === {len(first)}")
        # "more like this" on the third hit: the page shows the library's ranking for that segment
        target = first[2]
        expected = index.search_video(target.id, 10)
        chromium.click("#results .result:nth-child(3) .more-like")
        chromium.wait_for(
            "document.getElementById('status').textContent.includes('like ') && "
            f"document.querySelectorAll('#results .result').length === {len(expected)}"
        )
        shown = chromium.evaluate(
            "[...document.querySelectorAll('#results .result')].map(li => Number(li.dataset.id))"
        )
        assert shown == [h.id for h in expected] and shown[0] == target.id
        assert chromium.evaluate("document.getElementById('player').hidden")  # the button does not play

        # drop a picture (a thumbnail the server made) on the image target: the library's image ranking
        thumb = httpx.get(f"{url}/api/thumbnail/{first[0].id}").content
        expected = index.search_image(thumb, 10)
        chromium.evaluate(
            "(async () => { const blob = await (await fetch("
            f"'/api/thumbnail/{first[0].id}')).blob(); const dt = new DataTransfer(); "
            "dt.items.add(new File([blob], 'frame.jpg', {type: 'image/jpeg'})); "
            "document.getElementById('image-drop').dispatchEvent("
            "new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true})); })()"
        )
        chromium.wait_for("document.getElementById('status').textContent.includes('like the image')")
        shown = chromium.evaluate(
            "[...document.querySelectorAll('#results .result')].map(li => Number(li.dataset.id))"
        )
        assert shown == [h.id for h in expected]

        # one result per video, each with a timeline strip; a click on a bar plays from that moment
        chromium.evaluate("document.getElementById('group').checked = true")
        chromium.click("#search-button")
        chromium.wait_for("document.querySelectorAll('#results .result .timeline').length === 3")
        bars = chromium.evaluate(
            "document.querySelectorAll('#results .result:nth-child(1) .timeline span').length"
        )
        from stanvid.search.query import search

        best = search(index, query, 3, group_by="file")[0]
        assert bars == len(best.timeline) == 3
        seg = best.timeline[-1]
        chromium.click("#results .result:nth-child(1) .timeline span:last-child")
        state = chromium.wait_for(
            "(() => { const v = document.getElementById('video'); "
            f"return v.readyState >= 2 && v.currentTime >= {seg['start'] - 0.01} "
            "? {time: v.currentTime, error: v.error && v.error.code} : null; })()"
        )
        assert state["error"] is None and seg["start"] - 0.01 <= state["time"] <= seg["end"] + 1.0

        # a file that is not an image is refused on the page with the reason
        chromium.evaluate(
            "(() => { const dt = new DataTransfer(); dt.items.add(new File(['hello'], 'notes.txt', "
            "{type: 'text/plain'})); document.getElementById('image-drop').dispatchEvent("
            "new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true})); })()"
        )
        chromium.wait_for("document.getElementById('status').classList.contains('error')")
        assert "not an image" in chromium.evaluate("document.getElementById('status').textContent")
    index.close()

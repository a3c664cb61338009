"""The HTML report in a real headless browser: every image decodes, no console error, no network request.

Chromium (Debian's package) is installed by the ``chromium`` fixture when missing, as ``slurm_cluster`` installs
Slurm: with apt-get when we are root, else the tests skip saying why. The browser is driven with the Chrome
DevTools Protocol over ``--remote-debugging-pipe`` (JSON messages ending in NUL on fds 3 and 4: no websocket
client needed): navigate to the file, wait for the load event, then a JS snippet awaits ``img.decode()`` for each
image and reports its ``naturalWidth``; errors come from ``Runtime.exceptionThrown``, ``console.error`` and
``Log.entryAdded``, requests from ``Network.requestWillBeSent``. Negative checks: a report with one corrupted
image, and one with a script error, must be caught by the same checks.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from debian import apt_install, which

from lmlab.analysis import load_runs, plot_capacity, plot_lines, runs_table, write_html_report
from lmlab.analysis.plot import plot_curves
from lmlab.analysis.report import Section

pytestmark = pytest.mark.slow  # starts a browser (~2-5 s), and may apt-get it first

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
APT_PACKAGES = ("chromium",)


def find_browser() -> str | None:
    return next((p for p in (which(b) for b in BROWSERS) if p), None)


def ensure_browser() -> tuple[str | None, str | None]:
    """``(path, None)`` when a Chromium is there (already, or installed now with apt-get), else ``(None, why)``."""
    found = find_browser()
    if found:
        return found, None
    why = apt_install(APT_PACKAGES, "browser")
    if why:
        return None, f"Chromium is not installed: {why}"
    found = find_browser()
    return (found, None) if found else (None, "apt-get installed chromium but no browser binary was found")


class Browser:
    """A headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4 of the browser)."""

    def __init__(self, binary: str, timeout: float = 60.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="lmlab-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def fds() -> None:  # the browser reads commands on fd 3 and writes replies on fd 4
            # copies above 10 first (a pipe end may itself be fd 3 or 4); dup2 onto an fd that is already the
            # target keeps its close-on-exec flag, hence the explicit set_inheritable
            r, w = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)

        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--remote-debugging-pipe", f"--user-data-dir={self.profile}", "about:blank"]
        self.proc = subprocess.Popen(args, preexec_fn=fds, close_fds=False, start_new_session=True,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._replies: dict[int, queue.Queue] = {}
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self._lock:
                    if "id" in msg and msg["id"] in self._replies:
                        self._replies[msg["id"]].put(msg)
                    else:
                        self.events.append(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        with self._lock:
            self._next_id += 1
            mid = self._next_id
            self._replies[mid] = queue.Queue()
        msg = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        try:
            reply = self._replies[mid].get(timeout=self.timeout)
        except queue.Empty:
            raise TimeoutError(f"no reply to {method} in {self.timeout} s; browser stderr: {self.stderr()}") from None
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, session: str, since: int) -> dict:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            with self._lock:
                for ev in self.events[since:]:
                    if ev.get("method") == method and ev.get("sessionId") == session:
                        return ev
            time.sleep(0.02)
        raise TimeoutError(f"no {method} in {self.timeout} s")

    def stderr(self) -> str:
        return "(running)" if self.proc.poll() is None else (self.proc.stderr.read() or b"").decode()[-2000:]

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the browser and its helper processes, all ours
            self.proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


# Waits for every image to decode (or fail), then describes each; a broken image has naturalWidth 0.
IMAGES_JS = """(async () => {
  const imgs = Array.from(document.images);
  await Promise.all(imgs.map(img => img.decode().catch(() => null)));
  return imgs.map(img => ({alt: img.alt, complete: img.complete, width: img.naturalWidth,
                           height: img.naturalHeight, type: img.src.slice(5, img.src.indexOf(";"))}));
})()"""


@contextlib.contextmanager
def open_page(browser: Browser, path: Path):
    """A fresh tab showing ``path`` once loaded: yields ``(session, index of its first event)``."""
    target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    try:
        since = len(browser.events)
        for domain in ("Runtime", "Log", "Page", "Network"):
            browser.call(f"{domain}.enable", session=session)
        browser.call("Page.navigate", {"url": path.resolve().as_uri()}, session=session)
        browser.wait_event("Page.loadEventFired", session, since)
        yield session, since
    finally:
        browser.call("Target.closeTarget", {"targetId": target})


def evaluate(browser: Browser, session: str, expression: str):
    res = browser.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True},
                       session=session)
    if "exceptionDetails" in res:
        raise RuntimeError(f"JS error: {res['exceptionDetails']}")
    return res["result"]["value"]


def inspect_page(browser: Browser, path: Path) -> dict:
    """Open ``path`` in a fresh tab: its images, errors (exceptions, console errors, error log entries) and the
    URLs it requested."""
    with open_page(browser, path) as (session, since):
        images = evaluate(browser, session, IMAGES_JS)
        time.sleep(0.2)  # let late console messages arrive
        with browser._lock:
            events = [e for e in browser.events[since:] if e.get("sessionId") == session]
    errors, requests = [], []
    for ev in events:
        m, p = ev.get("method"), ev.get("params", {})
        if m == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            errors.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errors.append("console." + p["type"] + ": " + " ".join(str(a.get("value")) for a in p.get("args", [])))
        elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
            errors.append(f"log: {p['entry'].get('text')}")
        elif m == "Network.requestWillBeSent":
            requests.append(p["request"]["url"])
    return {"images": images, "errors": errors, "requests": requests}


def problems(page: dict) -> list[str]:
    """What is wrong with an inspected page: broken images, errors, requests leaving the file."""
    out = [f"broken image {img['alt']!r} ({img['type']})" for img in page["images"]
           if not img["complete"] or img["width"] <= 0 or img["height"] <= 0]
    out += page["errors"]
    out += [f"request to {u[:60]}" for u in page["requests"] if not u.startswith(("file:", "data:"))]
    return out


@pytest.fixture(scope="module")
def browser():
    binary, why = ensure_browser()
    if binary is None:
        pytest.skip(why)
    b = Browser(binary)
    try:
        b.call("Browser.getVersion")
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report with every kind of content: PNG and SVG line plots, the capacity figure in both formats, a
    DataFrame table, a {key: value} table, rows of dicts."""
    import yaml

    tmp = tmp_path_factory.mktemp("browser_report")
    root = tmp / "runs"
    for dim in (16, 32):
        for seed in (0, 1):
            d = root / f"dim={dim}_seed={seed}"
            d.mkdir(parents=True)
            (d / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "model": {"dim": dim}}))
            rows = [{"step": s, "loss": (1 + seed * 0.1) * 32 / dim / s} for s in range(1, 21)]
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (d / "summary.json").write_text(json.dumps({"status": "completed", "num_params": dim * 100}))
    runs = load_runs(root)
    png = plot_lines({r.name: r.series("loss") for r in runs}, tmp / "loss.png", "step", "loss", "Loss")
    svg = plot_curves(runs, "loss", tmp / "loss.svg", by=["model.dim"])["path"]
    grid = [{"mode": m, "params": p, "facts": f, "bits_per_fact": 8.0, "recall": min(1.0, p / 20 / f)}
            for m in ("weight", "tool") for p in (1e4, 2e4, 4e4) for f in (250, 500, 1000)]
    cap_png = plot_capacity(grid, tmp / "capacity.png")["path"]
    cap_svg = plot_capacity(grid, tmp / "capacity.svg")["path"]
    table = runs_table(runs)
    path = write_html_report(tmp / "report.html", "Browser check", [
        Section("Runs", text="one row per run", table=table[["name", "model.dim", "seed", "final.loss"]]),
        Section("Curves", images=[png, svg]),
        Section("Capacity", table={"runs": len(runs), "slope": 0.98}, images=[cap_png, cap_svg]),
        {"heading": "Rows", "table": [{"a": 1, "b": None}, {"a": 2.5, "b": "x"}]},
    ])
    return path


def test_report_renders_in_a_real_browser(browser, report):
    page = inspect_page(browser, report)
    assert problems(page) == []
    assert [img["type"] for img in page["images"]] == ["image/png", "image/svg+xml", "image/png", "image/svg+xml"]
    assert all(img["width"] > 300 and img["height"] > 200 for img in page["images"])
    # the runs table sorts on a click: the final.loss column, ascending then descending
    sort_js = """(() => {
      const table = document.querySelector("table"), th = table.querySelectorAll("th")[3];
      const col = () => Array.from(table.tBodies[0].rows).map(r => Number(r.cells[3].textContent));
      const before = col(); th.click(); const up = col(); th.click(); return [before, up, col()];
    })()"""
    with open_page(browser, report) as (session, _):
        before, up, down = evaluate(browser, session, sort_js)
    assert len(up) == 4 and up == sorted(before) and down == sorted(before, reverse=True) and up != before


def test_broken_image_and_script_error_are_caught(browser, report, tmp_path):
    text = report.read_text()
    payloads = re.findall(r'src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)"', text)
    assert payloads
    # a corrupted SVG (valid base64, not an image) in place of the first one
    broken = tmp_path / "broken.html"
    broken.write_text(text.replace(payloads[0], base64.b64encode(b"<svg><unclosed").decode(), 1))
    page = inspect_page(browser, broken)
    found = problems(page)
    assert len(found) == 1 and found[0].startswith("broken image 'loss.svg'"), found
    # a script error and a console.error
    bad_js = tmp_path / "bad_js.html"
    bad_js.write_text(text.replace("</body>", "<script>console.error('boom'); undefinedFunction();</script></body>"))
    found = problems(inspect_page(browser, bad_js))
    assert any("boom" in f for f in found) and any("undefinedFunction" in f for f in found), found
    # a resource fetched from the network would make the report depend on being online
    online = tmp_path / "online.html"
    online.write_text(text.replace("</body>", '<img alt="remote" src="http://127.0.0.1:9/x.png"></body>'))
    found = problems(inspect_page(browser, online))
    assert any("request to http://127.0.0.1:9/x.png" in f for f in found), found
    assert any("broken image 'remote'" in f for f in found), found


def test_memory_app_report_with_svg_figures(browser, tmp_path):
    from memory.analyze import make_report
    from test_memory_analyze import make_memory_runs

    root = make_memory_runs(tmp_path)
    summary = make_report(root, tmp_path / "out", fmt="svg")
    page = inspect_page(browser, Path(summary["files"]["html"]))
    assert problems(page) == []
    types = [img["type"] for img in page["images"]]
    assert len(types) == 6 and set(types) == {"image/svg+xml"}

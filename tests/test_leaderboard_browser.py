"""The built leaderboard page in headless Chromium (Debian's ``chromium``), over file://.

Driven through the Chrome DevTools Protocol with ``websocket-client`` (no browser download, no
driver binary). Skipped when there is no chromium binary or no websocket-client, except under CI
(CI=true), where that is a failure: CI installs both (apt ``chromium``, pip ``websocket-client``).
Set LEADERBOARD_SCREENSHOT=path to also save the page's screenshot there.
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from leaderboard.__main__ import find_browser
from leaderboard.build import build
from leaderboard.samples import add_probe, bad_records, write_samples

try:
    import websocket  # websocket-client
except ImportError:
    websocket = None

CHROMIUM = find_browser()
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
pytestmark = pytest.mark.timeout(240)  # ~10 s on an idle machine; chromium starts slowly under load


def _require_browser() -> None:
    missing = [what for what, ok in (("a chromium binary on PATH (apt-get install chromium)", CHROMIUM),
                                     ("the websocket-client package", websocket)) if not ok]
    if missing:
        (pytest.fail if IN_CI else pytest.skip)("needs " + " and ".join(missing))


class Page:
    """A headless Chromium with one page, and the few CDP calls the test needs."""

    def __init__(self, tmp: Path):
        profile = tmp / "profile"
        profile.mkdir()
        self.stderr = open(tmp / "chromium.log", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", f"--user-data-dir={profile}", "--remote-debugging-port=0",
             "--remote-allow-origins=*", "--window-size=1400,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=self.stderr,
            env={**os.environ, "TMPDIR": str(tmp)})  # its scratch files go with the test's tmp dir
        port = self._port(profile / "DevToolsActivePort")
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(url, timeout=30, suppress_origin=True)
        self.ids = itertools.count(1)
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def _port(self, active_port: Path, timeout: float = 60) -> int:
        # With --remote-debugging-port=0 Chromium writes the port it chose into the profile.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            text = active_port.read_text() if active_port.exists() else ""
            if "\n" in text:
                return int(text.split("\n")[0])
            time.sleep(0.05)
        raise TimeoutError("chromium did not open its DevTools port")

    def call(self, method: str, **params) -> dict:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self.events.append(msg)

    def wait_event(self, name: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events:
                if e.get("method") == name:
                    self.events.remove(e)
                    return e
            self.ws.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                self.events.append(json.loads(self.ws.recv()))
            finally:
                self.ws.settimeout(30)
        raise TimeoutError(name)

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise AssertionError(f"{expression!r} threw: {r['exceptionDetails']}")
        return r["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen so far (incl. CSP reports)."""
        self.call("Runtime.evaluate", expression="0")  # flush pending events
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif m == "Runtime.exceptionThrown":
                out.append(json.dumps(p["exceptionDetails"])[:500])
            elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"{p['entry'].get('url', '')}: {p['entry']['text']}")
        return out

    def screenshot(self, path: Path, full_page: bool = False) -> None:
        params: dict = {"format": "png"}
        if full_page:  # the tables and the start of the definitions; capped, rendering is slow
            height = min(self.js("document.documentElement.scrollHeight"), 2400)
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": 1400, "height": height, "scale": 1})
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", **params)["data"]))

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.stderr.close()


@pytest.fixture()
def page(tmp_path):
    _require_browser()
    p = Page(tmp_path)
    yield p
    p.close()


ROW_IDS = "Array.from(document.querySelectorAll('table[data-ranking=ranking-1] tbody tr')).map(tr => tr.dataset.row)"
VISIBLE = "Array.from(document.querySelectorAll('table.board tbody tr')).filter(tr => !tr.hidden && tr.offsetParent !== null).map(tr => tr.dataset.row)"
# row id → "<first job key>-<class>", the way the tests name rows
BY_ID = ("(() => { const m = {}; window.LEADERBOARD.rankings.forEach(rk => rk.rows.forEach(r => m[r.id] = r.records[0] + '-' + r.class));"
         " return m; })()")


def _select(name: str, value: str) -> str:
    return (f"(() => {{ const s = document.getElementById('filter-{name}'); s.value = {json.dumps(value)};"
            " s.dispatchEvent(new Event('change')); })()")


def test_page_in_headless_chromium(tmp_path, page):
    write_samples(tmp_path / "records", bad=True)
    site = tmp_path / "site"
    build(tmp_path / "records" / "runs", tmp_path / "records" / "results", site, tmp_path / "LEADERBOARD.md")

    page.call("Page.navigate", url=(site / "index.html").as_uri())
    page.wait_event("Page.loadEventFired")
    assert page.js("typeof window.LEADERBOARD") == "object"
    name = page.js(BY_ID)

    # Every valid configuration appears once (its seeds combined), as a forget and a retain row; the bad ones do not.
    firsts = {"k-noop-star", "k-gold-star", "k-esd-star-0", "k-uce-star", "k-fmn-star", "k-noise-star", "k-close-star",
              "k-noop-stripes", "k-esd-stripes", "k-paper"}
    rows = page.js("Array.from(document.querySelectorAll('table.board tbody tr')).map(tr => tr.dataset.row)")
    assert sorted(name[r] for r in rows) == sorted(f"{k}-{c}" for k in firsts for c in ("forget", "retain"))
    for bad in bad_records():
        if bad != "other_protocol":
            assert page.js(f"document.body.textContent.includes({json.dumps(bad)})")  # in the build report
    assert page.js("document.querySelectorAll('section.ranking').length") == 2
    assert page.js("document.querySelectorAll('table.board tr.ref').length") == 6
    # Verdicts with their probabilities; the reference rows judged like every method.
    assert page.js("document.querySelector('table.board tr.ref span.verdict').textContent") == "not erased"
    assert page.js("document.querySelectorAll('table.board span.v-removed').length") >= 1
    assert page.js("document.querySelectorAll('table.board span.prob').length") >= 10
    assert page.js("document.querySelectorAll('table.matrix tbody tr').length") == 10
    screenshot = tmp_path / "leaderboard.png"
    page.screenshot(screenshot, full_page=True)

    # Sorting by CCS reorders the rows: reference rows stay on top, the rest ascend, then descend.
    before = page.js(ROW_IDS)
    row = "(id => window.LEADERBOARD.rankings[0].rows.find(r => r.id === id))"
    page.js("document.querySelector('table[data-ranking=ranking-1] th[data-key=ccs] button').click()")
    after = page.js(ROW_IDS)
    assert after != before and sorted(after) == sorted(before)
    assert page.js("document.querySelector('table[data-ranking=ranking-1] th[data-key=ccs]').getAttribute('aria-sort')") == "ascending"
    values = page.js(f"{ROW_IDS}.map(id => [{row}(id).reference, {row}(id).values.ccs])")
    refs = [v for r, v in values if r]
    others = [v for r, v in values if not r]
    assert [r for r, _ in values][: len(refs)] == [r for r, _ in values if r]  # references first
    assert others == sorted(others)
    page.js("document.querySelector('table[data-ranking=ranking-1] th[data-key=ccs] button').click()")
    values = page.js(f"{ROW_IDS}.map(id => [{row}(id).reference, {row}(id).values.ccs])")
    assert [v for r, v in values if not r] == sorted(others, reverse=True)
    # Sorting by a probe's verdict follows the schema's verdict order.
    page.js("document.querySelector('table[data-ranking=ranking-1] th[data-key=\"verdict:partial_diffusion\"] button').click()")
    order = page.js("window.LEADERBOARD.verdict_order")
    keys = page.js(f"{ROW_IDS}.map(id => {row}(id)).filter(r => !r.reference && r.class === 'forget').map(r => r.verdicts.partial_diffusion.key)")
    assert [order.index(k) for k in keys] == sorted(order.index(k) for k in keys)

    # Filters hide rows: concept, class, and method (which keeps the reference rows).
    everything = page.js(VISIBLE)
    page.js(_select("concept", "stripes"))
    assert sorted(name[r] for r in page.js(VISIBLE)) == sorted(f"{k}-{c}" for k in ("k-noop-stripes", "k-esd-stripes")
                                                               for c in ("forget", "retain"))
    assert page.js("document.getElementById('ranking-2').hidden") is True
    page.js(_select("class", "forget"))
    assert sorted(name[r] for r in page.js(VISIBLE)) == ["k-esd-stripes-forget", "k-noop-stripes-forget"]
    page.js("document.getElementById('filter-reset').click()")
    page.js("new Promise(r => setTimeout(r, 50))")
    assert sorted(page.js(VISIBLE)) == sorted(everything)
    page.js(_select("method", "uce"))
    shown = [name[r] for r in page.js(VISIBLE)]
    assert "k-uce-star-forget" in shown and "k-esd-star-0-forget" not in shown
    assert "k-noop-star-forget" in shown and "k-gold-star-retain" in shown
    assert "shown" in page.js("document.getElementById('shown').textContent")
    page.js(_select("method", ""))

    # A detail view opens, with the probe's curve plot and the image grids loaded from the site folder.
    esd = next(r for r in rows if name[r] == "k-esd-star-0-forget").rsplit("-", 1)[0]
    page.js(f"document.querySelector('button.detail-open[data-detail=detail-{esd}]').click()")
    assert page.js(f"document.getElementById('detail-{esd}').open") is True
    assert page.js(f"document.querySelectorAll('#detail-{esd} svg.curve polyline').length") >= 3
    assert page.js(f"document.querySelectorAll('#detail-{esd} table.seeds-table tbody tr').length") == 3  # one per seed
    loaded = page.js(f"""new Promise(resolve => {{
        const imgs = Array.from(document.querySelectorAll('#detail-{esd} img'));
        const t0 = Date.now();
        (function poll() {{
            if (imgs.every(i => i.complete && i.naturalWidth > 0) || Date.now() - t0 > 5000)
                resolve(imgs.map(i => i.naturalWidth));
            else setTimeout(poll, 50);
        }})();
    }})""")
    assert len(loaded) == 4 and all(w > 0 for w in loaded)
    page.screenshot(tmp_path / "leaderboard-detail.png")
    page.js(f"document.querySelector('#detail-{esd} button.close').click()")
    assert page.js(f"document.getElementById('detail-{esd}').open") is False

    # Record strings are text: the <script>/<img onerror> prompts and params render literally.
    fmn = next(r for r in rows if name[r] == "k-fmn-star-forget").rsplit("-", 1)[0]
    page.js(f"document.querySelector('button.detail-open[data-detail=detail-{fmn}]').click()")
    text = page.js(f"document.getElementById('detail-{fmn}').textContent")
    assert "<script>window.__xss = 1</script> a star" in text
    assert '<img src="x" onerror="window.__xss = 2"> star' in text
    assert "<script>window.__xss = 3</script>" in text
    assert page.js("typeof window.__xss") == "undefined"
    assert page.js("document.scripts.length") == 2  # data.js and app.js only
    assert page.js("document.querySelectorAll('main img[src=x], main b').length") == 0

    assert page.errors() == []
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("LEADERBOARD_SCREENSHOT"):
        target = Path(os.environ["LEADERBOARD_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, target)


def test_per_probe_columns_sort_from_the_second_header_row(tmp_path, page):
    """With two probes a per-probe column's header sits in the second row, under its metric's group:
    clicking it sorts, and sorting by another column clears its mark."""
    write_samples(tmp_path / "records")
    add_probe(tmp_path / "records", "noise", "noise-based")
    site = tmp_path / "site"
    build(tmp_path / "records" / "runs", tmp_path / "records" / "results", site, tmp_path / "LEADERBOARD.md")
    page.call("Page.navigate", url=(site / "index.html").as_uri())
    page.wait_event("Page.loadEventFired")
    table = "document.querySelector('table[data-ranking=ranking-1]')"
    assert page.js(f"{table}.tHead.rows.length") == 2
    noise, erasure = f"{table}.querySelector('th[data-key=\"recover:noise\"]')", f"{table}.querySelector('th[data-key=erasure]')"
    assert page.js(f"{noise}.parentElement.rowIndex") == 1 and page.js(f"{noise}.textContent").startswith("noise-based")
    before = page.js(ROW_IDS)
    page.js(f"{noise}.querySelector('button').click()")
    assert page.js(f"{noise}.getAttribute('aria-sort')") == "ascending" and sorted(page.js(ROW_IDS)) == sorted(before)
    page.js(f"{noise}.querySelector('button').click()")
    assert page.js(f"{noise}.getAttribute('aria-sort')") == "descending"
    page.js(f"{erasure}.querySelector('button').click()")
    assert page.js(f"{erasure}.getAttribute('aria-sort')") == "ascending" and page.js(f"{noise}.getAttribute('aria-sort')") == "none"
    assert page.errors() == []


def test_screenshot_command_renders_a_built_page(tmp_path):
    from leaderboard.__main__ import main

    _require_browser()
    write_samples(tmp_path / "records")
    build(tmp_path / "records" / "runs", tmp_path / "records" / "results", tmp_path / "site", tmp_path / "LEADERBOARD.md")
    png = tmp_path / "shot" / "board.png"
    assert main(["screenshot", str(tmp_path / "site" / "index.html"), str(png), "--height", "900"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert main(["screenshot", str(tmp_path / "absent.html"), str(png)]) == 2

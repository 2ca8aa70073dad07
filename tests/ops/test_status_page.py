"""Issue 11 item 4: the status page (`GET /` on the metrics port) in a real browser, headless Chromium.

A service runs in this process on the in-memory connectors with the real SmolLM2 model and serves its
metrics port (`metrics.serve` with the service's own `Health`; the page reads the module's `StatusBoard`, fed
by the service's published annotations). One stream gets regular log lines, then one wildly different line
(with HTML in it, which the page must show as text). Chromium loads the page, runs its JavaScript (which fetches
`status.json`) and dumps the DOM: the injected line must be in a row marked as an anomaly, the partition must
be listed and the summary must say ready. A screenshot is taken too and checked for the anomaly row's colour;
set STATUS_PAGE_SCREENSHOT=path to keep it (docs/img/status_page.png was made that way).

Needs Debian's `chromium` (`apt-get install -y chromium`); without it the test is skipped with that reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path

import pytest

from connectors.memory import MemorySink, MemorySource, MemoryStore, MemoryTopic
from model.loader import load_model
from pipeline.devstack.processes import free_port
from pipeline.service import metrics
from pipeline.service.engine import Engine
from pipeline.service.service import Service
from pipeline.settings import load_settings

pytestmark = [pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
STREAM = "web-frontend-7"
ANOMALY = "kernel: BUG: unable to handle page fault <script>alert('x')</script> at 0xffff8a3c Ω≈ç√ ünïcødé ###"
ANOMALY_RGB = (0xFF, 0xE0, 0xE0)  # `.anomaly{background:#ffe0e0}` in the page's CSS


def _chromium(*args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Headless Chromium with a throwaway profile; `--virtual-time-budget` lets the page's JS (fetch) finish."""
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-dev-shm-usage", "--no-first-run", "--virtual-time-budget=3000", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)


class _Page(HTMLParser):
    """What a DOM dump shows: table rows (class attribute, cell texts), <h3> texts, the text of elements
    with an id, and every element name (to count <script> elements)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, list[str]]] = []
        self.headings: list[str] = []
        self.by_id: dict[str, str] = {}
        self.elements: list[str] = []
        self._cell: list[str] | None = None
        self._heading: list[str] | None = None
        self._id: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.elements.append(tag)
        if tag == "tr":
            self.rows.append((a.get("class") or "", []))
        elif tag in ("td", "th") and self.rows:
            self._cell = []
        elif tag == "h3":
            self._heading = []
        if tag == "p" and a.get("id"):
            self._id = a["id"]

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1][1].append("".join(self._cell))
            self._cell = None
        elif tag == "h3" and self._heading is not None:
            self.headings.append("".join(self._heading))
            self._heading = None
        elif tag == "p":
            self._id = None

    def handle_data(self, data: str) -> None:
        for sink in (self._cell, self._heading):
            if sink is not None:
                sink.append(data)
        if self._id:
            self.by_id[self._id] = self.by_id.get(self._id, "") + data


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (headless browser): apt-get install -y chromium")
def test_status_page_in_headless_chromium_shows_the_injected_anomaly(tmp_path, monkeypatch):
    # A board of its own: streams and partitions of earlier tests in this process would push the row off the shot.
    board = metrics.StatusBoard()
    monkeypatch.setattr(metrics, "STATUS", board)
    settings = load_settings(None, **{
        "model": {"threads": 1},
        "cache": {"sinks": 4, "window": 252, "chunk": 64},
        "kafka": {"output_topic": "out", "max_poll_records": 8},
        "score": {"warmup_lines": 8},
        "checkpoint": {"every_records": 8, "every_seconds": 2.0},
    })
    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    topic, sink = MemoryTopic("status-in"), MemorySink()
    for i in range(24):
        line = f"INFO dfs.DataNode: Receiving block blk_{1000 + i} src: /10.0.0.{i % 9}:50010 dest: /10.0.0.1:50010\n"
        topic.append(0, STREAM.encode(), line.encode())
    anomaly_offset = topic.append(0, STREAM.encode(), (ANOMALY + "\n").encode()).offset
    service = Service(settings, Engine(lm, settings), MemorySource.factory(topic), sink, MemoryStore())
    scored, housekept = threading.Event(), threading.Event()
    observe, housekeeping = board.observe, service._housekeeping

    def observed(stream, annotation):
        observe(stream, annotation)
        if annotation["source"]["offset"] == anomaly_offset:
            scored.set()

    def housekept_after_scoring():
        was_scored = scored.is_set()
        housekeeping()
        if was_scored:  # a whole pass after the line was scored: lag and checkpoint age are on the board
            housekept.set()

    board.observe = observed
    service._housekeeping = housekept_after_scoring
    port = free_port()
    server = metrics.serve("127.0.0.1", port, service.health)
    runner = threading.Thread(target=service.run, kwargs={"install_signals": False}, daemon=True)
    runner.start()
    try:
        assert scored.wait(300), "the service did not score the injected line"
        lines = board.snapshot()["streams"].get(STREAM, [])
        flagged = next((line for line in lines if line["offset"] == anomaly_offset), None)
        assert flagged is not None and flagged["text"] == ANOMALY and flagged["anomaly"], (
            f"expected the injected line to be flagged as an anomaly (z > {settings.score.anomaly_z}), got {flagged}")
        assert housekept.wait(60), "no housekeeping pass after the line was scored"

        url = f"http://127.0.0.1:{port}/"
        dump = _chromium("--dump-dom", url)
        assert dump.returncode == 0, dump.stderr[-2000:]
        page = _Page()
        page.feed(dump.stdout)
        anomalous = [cells for cls, cells in page.rows if "anomaly" in cls.split()]
        assert any(cells[-1] == ANOMALY for cells in anomalous), (
            f"expected a row marked anomaly with the injected line, got rows {page.rows}")
        assert page.elements.count("script") == 1, "the line's <script> became an element: stream text is not escaped"
        assert STREAM in page.headings, page.headings
        assert page.by_id.get("summary", "").startswith("ready: true"), page.by_id
        partitions = [cells for _, cells in page.rows if cells and cells[0] == "status-in:0"]
        assert partitions and partitions[0][1] == "0", f"expected partition status-in:0 with lag 0, got {page.rows}"

        shot = tmp_path / "status_page.png"
        taken = _chromium(f"--screenshot={shot}", "--window-size=1000,520", "--hide-scrollbars", url)
        assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
        from PIL import Image

        with Image.open(shot) as img:
            rgb = img.convert("RGB")
            assert rgb.size == (1000, 520)
            colours = rgb.getcolors(maxcolors=1 << 20) or []
        pink = sum(n for n, c in colours if c == ANOMALY_RGB)
        assert pink > 500, f"the screenshot shows no anomaly row (#ffe0e0 pixels: {pink})"
        keep = os.environ.get("STATUS_PAGE_SCREENSHOT")
        if keep:
            Path(keep).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, keep)
    finally:
        service.request_stop()
        runner.join(timeout=60)
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (headless browser): apt-get install -y chromium")
def test_status_page_lists_recent_alerts_with_template_and_verdict(monkeypatch):
    """The page's alerts section renders `recent_alerts` of /status.json: stream, place, score, the template
    and the key's verdict, the text escaped (no model needed: the board is fed an annotation directly)."""
    board = metrics.StatusBoard()
    monkeypatch.setattr(metrics, "STATUS", board)
    verdict = {"lines": 40, "alerts": 2, "max_score": 7.25, "new_in_stream": 3, "key_score": 1.0879}
    line = {"line_no": 39, "text": ANOMALY, "z": 4.0, "anomaly": True, "alert": True, "score": 7.25,
            "template": {"id": 12, "text": "kernel: BUG: <*>", "seen_stream": 0, "seen_partition": 0,
                         "seen_reference": 0}}
    board.observe(STREAM, {"source": {"topic": "logs", "partition": 1, "offset": 77},
                           "score": {"lines": [line], "verdict": verdict}})
    health = metrics.Health()
    health.ready = True
    port = free_port()
    server = metrics.serve("127.0.0.1", port, health)
    try:
        dump = _chromium("--dump-dom", f"http://127.0.0.1:{port}/")
        assert dump.returncode == 0, dump.stderr[-2000:]
        page = _Page()
        page.feed(dump.stdout)
        rows = [cells for cls, cells in page.rows if cls == "anomaly" and cells and cells[0] == STREAM]
        verdict_cell = "2 / 7.25 / 3 / 1.09"  # alerts / max score / new templates / key score
        assert rows == [[STREAM, "logs:1:77", "39", "7.25", "#12 kernel: BUG: <*>", verdict_cell, ANOMALY]], rows
        assert page.elements.count("script") == 1  # the alert's <script> text stayed text
    finally:
        server.shutdown()
        server.server_close()

"""``rhbatch report``: a self-contained HTML page built from a real run directory.

The run's files are fetched by the real downloader from a loopback HTTP server; one test renders
the page in headless Chromium and counts the thumbnails that actually decoded.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import no_sleep
from PIL import Image

from pipeline import download as dl
from pipeline import store as st
from pipeline.client import RetryPolicy
from pipeline.errors import UsageError
from pipeline.report import build_report, cut_words

CHROMIUM = Path("/usr/bin/chromium")
PROMPTS = ["a red fox in snow", "a lighthouse at dusk", '<script>alert("x")</script> a cat & "dog"',
           "a tall ship"]
SEEDS = [11, 22, 33, 44]
COLORS = [(220, 60, 40), (40, 120, 220), (60, 180, 90), (230, 190, 40)]


def png(color: tuple[int, int, int], shade: int, size: int = 96) -> bytes:
    image = Image.new("RGB", (size, size), color)
    for i in range(size):  # a diagonal band so each seed looks different
        for j in range(max(0, i - shade * 6), min(size, i - shade * 6 + 12)):
            image.putpixel((j, i), (255, 255, 255))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Row:
    index: int
    row_id: str
    number: int
    inputs: dict
    workflow_id: str = "1904136902449209346"
    node_info_list: tuple = ()
    options: dict = field(default_factory=dict)


@pytest.fixture
def file_server() -> Iterator[tuple[str, dict[str, bytes]]]:
    bodies: dict[str, bytes] = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            body = bodies.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", bodies
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


OOM = {"node_name": "KSampler", "node_id": "3", "exception_type": "torch.OutOfMemoryError",
       "exception_message": "CUDA out of memory. Tried to allocate 2.00 GiB"}


def sweep_run(tmp_path: Path, base_url: str, bodies: dict[str, bytes]) -> Path:
    """A 4 x 4 sweep (6.text x 3.seed; 5.width is 2048 for the last prompt), downloaded.

    Outcomes: prompt 3 runs out of memory for three seeds and is rejected (803) for the fourth;
    prompt 0 / seed 44 is SUBMIT_UNKNOWN; prompt 1 / seed 33 succeeded but its URL expired (404).
    The other 10 rows succeeded and have a PNG on disk.
    """
    run_dir = tmp_path / "run"
    store = st.RunStore.open(run_dir, create=True)
    rows = []
    for p, prompt in enumerate(PROMPTS):
        for s, seed in enumerate(SEEDS):
            i = p * 4 + s
            inputs = {"6.text": prompt, "3.seed": seed, "5.width": 2048 if p == 3 else 1024,
                      "3.cfg": 7.0}
            rows.append(Row(i, f"p{p}:s{seed}", i + 1, inputs))
    store.insert_rows(rows)
    store.set_meta(columns=["6.text", "3.seed", "5.width", "3.cfg"],
                   bound={"6.text": "6.text", "3.seed": "3.seed", "5.width": "5.width",
                          "3.cfg": "3.cfg"},
                   manifest_source="sweeps/fox.yaml", created_at=1_700_000_000.0)
    for p in range(4):
        for s in range(4):
            i = p * 4 + s
            store.mark_submitting(i)
            if (p, s) == (0, 3):
                store.mark_unknown(i, "the create request timed out after it was sent")
                continue
            store.mark_submitted(i, f"19{i:017d}", st.RUNNING, 1_700_000_000.0 + 60 * i)
            at = 1_700_000_000.0 + 60 * i + 30
            if p == 3 and s < 3:
                store.mark_failed(i, code=805, error="RunningHub task failed (805): CUDA out of memory",
                                  failed_reason=OOM, at=at)
            elif p == 3:
                store.mark_failed(i, code=803, error="RunningHub create answered 803 <b>bad</b> input",
                                  at=at)
            else:
                path = f"/out/{i}.png"
                if (p, s) != (1, 2):
                    bodies[path] = png(COLORS[p], s)
                store.mark_success(i, [{"fileUrl": base_url + path, "fileType": "png", "nodeId": "9",
                                        "taskCostTime": 20.0 + i, "consumeCoins": 4.0}], at)
    policy = RetryPolicy(max_attempts=2, sleep=no_sleep)
    summary = asyncio.run(dl.download_run_async(store, policy=policy))
    assert (summary.downloaded, summary.failed) == (10, 1)
    store.close()
    return run_dir


@pytest.fixture
def run_dir(tmp_path: Path, file_server: tuple[str, dict[str, bytes]]) -> Path:
    return sweep_run(tmp_path, *file_server)


def test_report_is_one_self_contained_page(run_dir: Path):
    path = build_report(run_dir)
    assert path == run_dir / "report.html"
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower()
    assert "<link" not in page.lower() and "@import" not in page and "url(" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "http://127.0.0.1" not in page  # output URLs are not repeated on the page
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(srcs) == 10 and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    hrefs = [h for h in re.findall(r'href="([^"]+)"', page) if not h.startswith("#")]
    assert len(hrefs) == 10 and all(h.startswith("files/p") for h in hrefs)
    assert all((run_dir / h.replace("%3A", ":")).is_file() for h in hrefs)
    assert 'content="default-src \'none\'; img-src data:; style-src \'unsafe-inline\'"' in page
    assert "relative to this page (files/)" in page


def test_user_text_is_escaped(run_dir: Path):
    page = build_report(run_dir).read_text(encoding="utf-8")
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; a cat &amp; &quot;dog&quot;" in page
    assert "<b>bad</b>" not in page and "803 &lt;b&gt;bad&lt;/b&gt; input" in page


def test_summary_counts_costs_and_throughput(run_dir: Path):
    page = build_report(run_dir).read_text(encoding="utf-8")
    cards = dict((k, v) for v, k in re.findall(
        r'<div class="v">([^<]*)</div><div class="k">([^<]*)</div>', page))
    assert cards["rows"] == "16" and cards["succeeded"] == "11"
    assert cards["failed / cancelled / unknown"] == "5"
    assert cards["coins spent"] == "44"
    times = sorted(20.0 + i for i in range(12) if i != 3)  # the SUCCESS rows 0-2, 4-11
    assert cards["median task time"] == f"{times[5]:.1f} s"
    assert cards["p90 task time"] == f"{times[9]:.1f} s"
    # 15 finished rows between the first submit (t=0) and the last finish (row 15: 15 min 30 s)
    assert cards["rows finished per hour"] == f"{15 / (930 / 3600):,.1f}"
    assert cards["files downloaded"] == "10"
    assert "sweeps/fox.yaml" in page
    assert "<th>EXPIRED</th>" in page and "never regenerates a task" in page
    assert "rhbatch download" not in page  # the one missing file expired: downloading again is futile


def test_contact_sheet_follows_the_two_most_varied_columns(run_dir: Path):
    page = build_report(run_dir).read_text(encoding="utf-8")
    assert "<b>6.text</b> across, <b>3.seed</b> down" in page
    sheet = page.split('id="sheet"')[1].split('id="triage"')[0]
    assert sheet.count("<tr>") == 5  # header + 4 seeds
    assert re.findall(r'<th class="yh" title="(\d+)">', sheet) == ["11", "22", "33", "44"]
    assert sheet.count('class="ph"') == 6  # 4 failed, 1 unknown, 1 expired: placeholders
    assert sheet.count('<b class="s-FAILED">FAILED</b>') == 4
    assert sheet.count('<b class="s-SUBMIT_UNKNOWN">') == 1
    assert sheet.count("<span>file expired</span>") == 1
    assert "taskId: 1900000000000000005" in sheet and "6.text = a lighthouse at dusk" in sheet

    swapped = build_report(run_dir, x="3.seed", y="5.width", out=run_dir / "swapped.html")
    assert "<b>3.seed</b> across, <b>5.width</b> down" in swapped.read_text(encoding="utf-8")
    with pytest.raises(UsageError, match="'6.txt' is not an input column of this run: choose from "
                                          "6.text, 3.seed, 5.width, 3.cfg"):
        build_report(run_dir, x="6.txt")


def test_thumbnails_in_a_cell_are_labelled_by_the_third_axis(run_dir: Path):
    # 6.text x 5.width: each cell holds the four seeds of one prompt, told apart by their label
    page = build_report(run_dir, x="6.text", y="5.width").read_text(encoding="utf-8")
    sheet = page.split('id="sheet"')[1].split('id="triage"')[0]
    labels = re.findall(r'<div class="cap">#(\d+) [^<]*</div><div class="cap lab">([^<]*)</div>',
                        sheet)
    assert sorted(labels, key=lambda n: int(n[0])) == [
        (str(i + 1), f"3.seed = {SEEDS[i % 4]}") for i in range(16)]
    # 6.text x 3.seed: one row per cell; 5.width varies only from cell to cell: no label
    plain = build_report(run_dir).read_text(encoding="utf-8")
    assert 'class="cap lab"' not in plain


def test_row_labels_break_only_between_words():
    from pipeline.report import STYLE

    sheet_th = re.search(r"table\.sheet th\{[^}]*\}", STYLE).group()
    assert "word-break" not in sheet_th and "overflow-wrap:break-word" in sheet_th


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_row_labels_stay_on_one_line_in_a_narrow_window(run_dir: Path, tmp_path: Path):
    """The labels down the sheet (3.cfg, 11, ...) once wrapped mid-word ("3.cf g") when the wide
    prompts across squeezed their column."""
    path = build_report(run_dir)
    probe_script = (
        "<script>addEventListener('load',function(){var n=[];document.querySelectorAll('th.yh')"
        ".forEach(function(th){var r=document.createRange();r.selectNodeContents(th);"
        "n.push(r.getClientRects().length)});document.body.dataset.lines=n.join(',')});</script>")
    page = path.read_text(encoding="utf-8")
    probe = page.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
    probe = probe.replace("3.seed</th>", "3.cfg.seed</th>", 1).replace("</body>", probe_script + "</body>")
    probe_path = run_dir / "probe.html"
    probe_path.write_text(probe, encoding="utf-8")
    flags = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
             "--window-size=520,900", "--virtual-time-budget=3000"]
    dom = subprocess.run(flags + ["--dump-dom", probe_path.as_uri()], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    lines = re.search(r'data-lines="([^"]*)"', dom).group(1).split(",")
    assert lines == ["1"] * 5  # the corner (the y column's name) and the four seeds


def test_long_texts_are_cut_after_a_whole_word():
    message = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.65 GiB total capacity)"
    assert cut_words(message, 40) == "CUDA out of memory. Tried to allocate…"
    assert cut_words(message, len(message)) == message
    assert cut_words("a-very-long-path/without/any/spaces/at/all", 20) == "a-very-long-path/wi…"
    assert cut_words("word " * 10, 12) == "word word…"


def test_links_stay_relative_when_the_page_is_written_elsewhere(run_dir: Path, tmp_path: Path):
    out = tmp_path / "elsewhere" / "sweep.html"
    page = build_report(run_dir, out=out).read_text(encoding="utf-8")
    hrefs = [h for h in re.findall(r'href="([^"]+)"', page) if not h.startswith("#")]
    assert hrefs and all(h.startswith("../run/files/") for h in hrefs)
    assert all((out.parent / h.replace("%3A", ":")).resolve().is_file() for h in hrefs)


def test_failure_triage_groups_and_spreads(run_dir: Path):
    page = build_report(run_dir).read_text(encoding="utf-8")
    triage = page.split('id="triage"')[1]
    heads = re.findall(r'<div class="group" id="g\d+"><h3>([^<]*)</h3>', triage)
    assert heads == [
        "3 × FAILED · code 805 APIKEY_TASK_STATUS_ERROR · node 3 (KSampler) · torch.OutOfMemoryError",
        "1 × SUBMIT_UNKNOWN",  # ties keep the order of first appearance
        "1 × FAILED · code 803 APIKEY_INVALID_NODE_INFO",
    ]
    oom = triage.split('id="g0"')[1].split('id="g1"')[0]
    assert ('<li class="hl">all 3 failures have 5.width = 2048<span class="muted"> '
            "(4 of 16 rows have that value)</span></li>") in oom
    assert "all 3 failures have 6.text = a tall ship" in oom
    assert "<li>3.seed: 11 ×1" in oom
    assert "3.cfg" not in oom.split("<table>")[0]  # a column that never varies says nothing
    assert "CUDA out of memory. Tried to allocate 2.00 GiB" in oom
    assert oom.count("<tr><td class=\"num\">") == 3
    assert "<ul>" not in triage.split('id="g1"')[1]  # one row: its inputs are in its table


def test_a_run_without_failures_or_downloads_still_reports(tmp_path: Path):
    store = st.RunStore.open(tmp_path / "run", create=True)
    store.insert_rows([Row(0, "only", 1, {"3.seed": 1})])
    store.close()
    page = build_report(tmp_path / "run").read_text(encoding="utf-8")
    assert "No failed, cancelled or unknown rows." in page
    assert '<b class="s-PENDING">PENDING</b>' in page


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_headless_chromium_loads_every_thumbnail(run_dir: Path, tmp_path: Path):
    path = build_report(run_dir)
    page = path.read_text(encoding="utf-8")
    expected = int(re.search(r'data-thumbnails="(\d+)"', page).group(1))
    assert expected == 10
    probe_script = (
        "<script>addEventListener('load',function(){document.body.dataset.imagesLoaded="
        "Array.from(document.images).filter(function(i){return i.complete&&i.naturalWidth>0})"
        ".length;});</script>"
    )
    # the page forbids scripts; the probe copy allows this one inline script and nothing else
    probe = page.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
    probe = probe.replace("</body>", probe_script + "</body>")
    probe_path = run_dir / "probe.html"
    probe_path.write_text(probe, encoding="utf-8")
    flags = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
             "--window-size=1200,900", "--virtual-time-budget=3000"]
    dom = subprocess.run(flags + ["--dump-dom", probe_path.as_uri()], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert f'data-images-loaded="{expected}"' in dom
    shot = tmp_path / "report.png"
    subprocess.run(flags + [f"--screenshot={shot}", path.as_uri()], capture_output=True, timeout=60,
                   check=True)
    with Image.open(shot) as image:
        assert image.size == (1200, 900)
        colors = image.convert("RGB").getcolors(1_000_000) or []
    assert len(colors) > 50  # something was drawn, not a blank page
    target = os.environ.get("RHBATCH_REPORT_SCREENSHOT")
    if target:
        shutil.copyfile(shot, target)


# The rows the committed docs/report-demo-4x4.png shows (its captions), in input order. When the
# demo makes other rows, regenerate the picture: `rhbatch demo`, then `chromium --headless
# --screenshot=docs/report-demo-4x4.png --window-size=1400,1800 file://$PWD/outputs/demo/report.html`.
SCREENSHOT_ROW_IDS = [
    "r3015653f55465f11", "r3de4a5fc2524234f", "rde8caaff4fb8c2f5", "rd54086f9a80b9351",
    "r2ae0ec66bb7d8574", "r53938b36bc9e84ef", "r78b07b349b7423b3", "r38ce67e4d1eb4a07",
    "r6a81b5092162b71e", "rd40f4f88c4175b6c", "rb9c586c599651188", "r6d8c87b3787ecbf1",
    "r0f14b1e6f7908b4a", "rfade2b362ade7299", "rb73af5cb77b4bb99", "re345ae57d1cf505f",
]


def test_the_committed_screenshot_shows_the_rows_the_demo_makes():
    from pipeline import resources
    from pipeline.manifest import load_manifest

    manifest = load_manifest(resources.example_manifest_path("demo_sweep.csv"))
    assert [r.row_id for r in manifest.rows] == SCREENSHOT_ROW_IDS, (
        "the demo makes other rows now: regenerate docs/report-demo-4x4.png (see above)")
    with Image.open(Path(__file__).resolve().parent.parent / "docs" / "report-demo-4x4.png") as shot:
        assert shot.size == (1400, 1800)

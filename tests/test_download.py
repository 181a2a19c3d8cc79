"""``rhbatch download`` against a real HTTP server on loopback and a real run directory."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from pipeline import download as dl
from pipeline import store as st
from pipeline.client import RetryPolicy
from pipeline.export import write_results
from pipeline.store import FILE_PENDING

ROOT = Path(__file__).resolve().parent.parent


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_bytes(seed: int, size: int = 32) -> bytes:
    image = Image.new("RGB", (size, size), ((seed * 53) % 256, (seed * 97) % 256, (seed * 31) % 256))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


Behaviour = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class FileServer:
    """A loopback HTTP server: ``routes`` maps a path to a behaviour; ``hits`` counts requests."""

    routes: dict[str, Behaviour] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    release: threading.Event = field(default_factory=threading.Event)
    active: int = 0
    max_active: int = 0
    base_url: str = ""

    def url(self, path: str) -> str:
        return self.base_url + path

    def serve_bytes(self, path: str, body: bytes, content_type: str = "image/png") -> str:
        def send(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Content-Type", content_type)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)

        self.routes[path] = send
        return self.url(path)

    def serve_status(self, path: str, status: int) -> str:
        def send(h: BaseHTTPRequestHandler) -> None:
            h.send_response(status)
            h.send_header("Content-Length", "0")
            h.end_headers()

        self.routes[path] = send
        return self.url(path)


@pytest.fixture
def server() -> Iterator[FileServer]:
    state = FileServer()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            with lock:
                state.hits[self.path] += 1
                state.active += 1
                state.max_active = max(state.max_active, state.active)
            try:
                behaviour = state.routes.get(self.path)
                if behaviour is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    behaviour(self)
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                with lock:
                    state.active -= 1

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@dataclass
class Row:
    index: int
    row_id: str
    number: int = 0
    workflow_id: str = "1904136902449209346"
    node_info_list: tuple = ()
    inputs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)


def make_run(tmp_path: Path, outputs: list[list[dict[str, Any]] | None],
             row_ids: list[str] | None = None) -> st.RunStore:
    """A run whose row i succeeded with ``outputs[i]`` (None: the row failed)."""
    store = st.RunStore.open(tmp_path / "run", create=True)
    ids = row_ids or [f"r{i}" for i in range(len(outputs))]
    store.insert_rows(Row(i, ids[i], i + 1, inputs={"3.seed": i}) for i in range(len(outputs)))
    for i, outs in enumerate(outputs):
        store.mark_submitting(i)
        store.mark_submitted(i, f"19000000000000000{i:02d}", st.RUNNING, 1000.0 + i)
        if outs is None:
            store.mark_failed(i, code=805, error="task failed", at=1100.0 + i)
        else:
            store.mark_success(i, outs, 1100.0 + len(outputs) - i)  # later rows finished earlier
    return store


def out(url: str, node: str = "9", file_type: str | None = "png") -> dict[str, Any]:
    return {"fileUrl": url, "fileType": file_type, "nodeId": node, "taskCostTime": 20.0,
            "consumeCoins": 4.0}


def no_wait_policy(attempts: int = 3) -> tuple[RetryPolicy, list[float]]:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    return RetryPolicy(max_attempts=attempts, max_total_s=60.0, sleep=sleep), waits


def run(store: st.RunStore, **kwargs: Any) -> dl.DownloadSummary:
    kwargs.setdefault("policy", no_wait_policy()[0])
    return asyncio.run(dl.download_run_async(store, **kwargs))


def files(store: st.RunStore) -> dict[tuple[int, int], sqlite3.Row]:
    return {(r["row_idx"], r["n"]): r for r in store.conn.execute("SELECT * FROM files")}


def files_on_disk(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# -- the happy path ---------------------------------------------------------------------------


def test_every_file_is_downloaded_verified_and_exported(tmp_path, server):
    bodies = {f"/o/{i}/{k}": png_bytes(i * 10 + k) for i in range(4) for k in range(2)}
    outputs: list[list[dict[str, Any]] | None] = [
        [out(server.serve_bytes(f"/o/{i}/{k}", bodies[f"/o/{i}/{k}"]), node=str(9 + k))
         for k in range(2)]
        for i in range(4)
    ]
    outputs.append(None)  # a failed row has nothing to download
    store = make_run(tmp_path, outputs, ["r0", "57:35", "r2", "r3", "r4"])
    try:
        summary = run(store)
        assert (summary.downloaded, summary.skipped, summary.failed) == (8, 0, 0)
        assert summary.bytes == sum(len(b) for b in bodies.values())
        assert summary.errors == []
        rows = files(store)
        assert len(rows) == 8
        for (i, k), row in rows.items():
            body = bodies[f"/o/{i}/{k}"]
            assert row["status"] == "DOWNLOADED"
            assert row["sha256"] == hashlib.sha256(body).hexdigest()
            assert row["size"] == len(body)
            assert (store.run_dir / row["path"]).read_bytes() == body
        assert rows[(1, 0)]["path"] == "files/57_35_9_0.png"
        assert rows[(0, 1)]["path"] == "files/r0_10_1.png"
        assert not list((store.run_dir / "files").glob("*.part"))
        assert store.counts()[st.SUCCESS] == 4 and store.counts()[st.FAILED] == 1

        write_results(store)
        records = [json.loads(line) for line in
                   (store.run_dir / "results.jsonl").read_text().splitlines()]
        assert records[0]["files"][0] == {
            "path": "files/r0_9_0.png", "sha256": hashlib.sha256(bodies["/o/0/0"]).hexdigest(),
            "size": len(bodies["/o/0/0"]), "status": "DOWNLOADED", "nodeId": "9"}
        assert records[4]["files"] == []

        again = run(store)
        assert (again.downloaded, again.skipped, again.failed) == (0, 8, 0)
        assert all(n == 1 for n in server.hits.values())
    finally:
        store.close()


def test_oldest_urls_first_and_at_most_jobs_at_once(tmp_path, server):
    order: list[str] = []

    def slow(path: str) -> Behaviour:
        body = png_bytes(len(path))

        def send(h: BaseHTTPRequestHandler) -> None:
            order.append(path)
            time.sleep(0.03)
            h.send_response(200)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)

        return send

    outputs: list[list[dict[str, Any]] | None] = []
    for i in range(8):
        server.routes[f"/s/{i}"] = slow(f"/s/{i}")
        outputs.append([out(server.url(f"/s/{i}"))])
    store = make_run(tmp_path, outputs)  # row 7 finished first
    try:
        summary = run(store, jobs=1)
        assert summary.downloaded == 8
        assert order == [f"/s/{i}" for i in reversed(range(8))]
        store.conn.execute("DELETE FROM files")
        server.max_active = 0
        assert run(store, jobs=3).downloaded == 8
        assert server.max_active == 3
    finally:
        store.close()


def test_extension_comes_from_file_type_or_content_type_never_from_the_url(tmp_path, server):
    body = b"RIFF....WEBPVP8 fake"
    outputs: list[list[dict[str, Any]] | None] = [
        [out(server.serve_bytes("/a/evil.sh", body, "image/webp"), file_type=None)],
        [out(server.serve_bytes("/b/x.exe?y=1", body), file_type="p/n<g>")],
        [out(server.serve_bytes("/c", body, "application/octet-stream"), file_type="")],
        [out(server.serve_bytes("/d", body), file_type="averyveryverylongtype")],
    ]
    store = make_run(tmp_path, outputs)
    try:
        run(store)
        paths = {k: r["path"] for k, r in files(store).items()}
        assert paths == {(0, 0): "files/r0_9_0.webp", (1, 0): "files/r1_9_0.png",
                         (2, 0): "files/r2_9_0.bin", (3, 0): "files/r3_9_0.png"}
    finally:
        store.close()


# -- resuming and verifying -------------------------------------------------------------------


def test_a_killed_download_resumes_without_refetching_verified_files(tmp_path, server):
    bodies = {f"/k/{i}": png_bytes(i, 64) for i in range(4)}
    big = PNG_MAGIC + os.urandom(300_000 - len(PNG_MAGIC))  # a png-looking body
    started = threading.Event()

    def stalls_first_time(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", str(len(big)))
        h.end_headers()
        if server.hits["/k/big"] == 1:
            h.wfile.write(big[:100_000])
            h.wfile.flush()
            started.set()
            server.release.wait(10)  # until the test ends: the client is killed meanwhile
            return
        h.wfile.write(big)

    for path, body in bodies.items():
        server.serve_bytes(path, body)
    server.routes["/k/big"] = stalls_first_time
    outputs: list[list[dict[str, Any]] | None] = [[out(server.url(p))] for p in bodies]
    outputs.append([out(server.url("/k/big"))])
    store = make_run(tmp_path, outputs)
    store.close()
    run_dir = tmp_path / "run"
    code = f"from pipeline.download import download_run; download_run({str(run_dir)!r}, jobs=4)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        part = run_dir / "files" / "r4_9_0.png.part"
        deadline = time.monotonic() + 20
        done = 0
        while time.monotonic() < deadline:
            with sqlite3.connect(run_dir / "state.db", timeout=5) as conn:
                done = conn.execute("SELECT COUNT(*) FROM files WHERE status='DOWNLOADED'").fetchone()[0]
            conn.close()
            if done == 4 and started.is_set() and part.is_file() and part.stat().st_size > 0:
                break
            time.sleep(0.02)
        assert done == 4
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(10)
    assert part.is_file() and not (run_dir / "files" / "r4_9_0.png").exists()

    store = st.RunStore.open(run_dir)
    try:
        summary = run(store)
        assert (summary.downloaded, summary.skipped, summary.failed) == (1, 4, 0)
        assert all(server.hits[p] == 1 for p in bodies)
        assert server.hits["/k/big"] == 2
        assert (run_dir / "files" / "r4_9_0.png").read_bytes() == big
        assert not part.exists()
        assert files(store)[(4, 0)]["sha256"] == hashlib.sha256(big).hexdigest()
    finally:
        store.close()


def test_a_tampered_or_deleted_file_is_detected_and_fetched_again(tmp_path, server):
    bodies = {f"/t/{i}": png_bytes(i) for i in range(3)}
    store = make_run(tmp_path, [[out(server.serve_bytes(p, b))] for p, b in bodies.items()])
    try:
        assert run(store).downloaded == 3
        (store.run_dir / "files" / "r0_9_0.png").write_bytes(b"not the image")
        (store.run_dir / "files" / "r1_9_0.png").unlink()
        summary = run(store)
        assert (summary.downloaded, summary.skipped, summary.failed) == (2, 1, 0)
        assert sorted(summary.errors) == [
            "row 1 (r0) output 0, node 9: files/r0_9_0.png no longer matches its recorded sha256 "
            "(tampered, truncated or deleted); fetching it again",
            "row 2 (r1) output 0, node 9: files/r1_9_0.png is missing (tampered, truncated or "
            "deleted); fetching it again",
        ]
        assert (store.run_dir / "files" / "r0_9_0.png").read_bytes() == bodies["/t/0"]
        assert server.hits == Counter({"/t/0": 2, "/t/1": 2, "/t/2": 1})
    finally:
        store.close()


def test_a_short_body_or_server_error_is_retried_with_backoff(tmp_path, server):
    body = png_bytes(7, 64)

    def short_then_whole(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if server.hits["/short"] == 1:
            h.wfile.write(body[: len(body) // 2])
            h.close_connection = True
            return
        h.wfile.write(body)

    def error_then_ok(h: BaseHTTPRequestHandler) -> None:
        if server.hits["/flaky"] <= 2:
            h.send_response(503)
            h.send_header("Retry-After", "7")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    server.routes["/short"] = short_then_whole
    server.routes["/flaky"] = error_then_ok
    server.routes["/down"] = lambda h: h.send_error(500)
    store = make_run(tmp_path, [[out(server.url("/short"))], [out(server.url("/flaky"))],
                                [out(server.url("/down"))]])
    policy, waits = no_wait_policy(attempts=3)
    try:
        summary = run(store, policy=policy, jobs=1)
        assert (summary.downloaded, summary.failed) == (2, 1)
        rows = files(store)
        assert rows[(0, 0)]["sha256"] == rows[(1, 0)]["sha256"] == hashlib.sha256(body).hexdigest()
        assert rows[(2, 0)]["status"] == "FAILED" and rows[(2, 0)]["tries"] == 3
        assert rows[(2, 0)]["error"] == (
            "row 3 (r2) output 0, node 9: HTTP 500 (gave up after 3 attempts): run `rhbatch "
            "download` again while the URL is still valid (about 24 h after the task finished)")
        assert server.hits == Counter({"/short": 2, "/flaky": 3, "/down": 3})
        assert waits.count(7.0) == 2 and len(waits) == 5  # Retry-After honoured
        assert store.counts()[st.SUCCESS] == 3  # a failed download never touches the row
        assert not list((store.run_dir / "files").glob("*.part"))
    finally:
        store.close()


def test_a_slow_body_times_out_and_is_retried(tmp_path, server):
    body = png_bytes(3)

    def trickle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body[:10])
        h.wfile.flush()
        if server.hits["/slow"] == 1:
            server.release.wait(1.0)
        h.wfile.write(body[10:])

    server.routes["/slow"] = trickle
    store = make_run(tmp_path, [[out(server.url("/slow"))]])
    try:
        summary = run(store, timeout=httpx.Timeout(5.0, read=0.2))
        assert summary.downloaded == 1 and server.hits["/slow"] == 2
        assert (store.run_dir / "files" / "r0_9_0.png").read_bytes() == body
    finally:
        store.close()


# -- refusing -------------------------------------------------------------------------------


def test_expired_urls_are_final_and_never_regenerate(tmp_path, server):
    store = make_run(tmp_path, [[out(server.serve_status("/gone", 404))],
                                [out(server.serve_status("/forbidden", 403))],
                                [out(server.serve_status("/deleted", 410))]])
    try:
        summary = run(store)
        assert (summary.downloaded, summary.failed) == (0, 3)
        row = files(store)[(0, 0)]
        assert row["status"] == "EXPIRED" and row["path"] is None
        assert row["error"].startswith(
            "row 1 (r0) output 0, node 9: HTTP 404: the output URL has expired (RunningHub keeps "
            "output URLs for about 24 h after the task finishes); rhbatch never regenerates a task "
            "to recover a file.")
        assert {r["status"] for r in files(store).values()} == {"EXPIRED"}
        assert server.hits == Counter({"/gone": 1, "/forbidden": 1, "/deleted": 1})
        rows = list(store.iter_rows())
        assert [r["status"] for r in rows] == ["SUCCESS"] * 3
        assert [r["attempts"] for r in rows] == [1, 1, 1]
        again = run(store)  # final: not even asked again
        assert (again.downloaded, again.failed, again.skipped) == (0, 0, 0)
        assert sum(server.hits.values()) == 3
        assert not (store.run_dir / "files").exists() or files_on_disk(store.run_dir / "files") == []
    finally:
        store.close()


def test_only_http_and_https_urls_are_fetched(tmp_path, server):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy me")
    urls = [f"file://{secret}", "ftp://127.0.0.1/x.png", "javascript:alert(1)",
            "data:image/png;base64,AAAA", "/relative/path.png", "HTTP://" + server.url("/ok")[7:]]
    server.serve_bytes("/ok", png_bytes(1))
    store = make_run(tmp_path, [[out(u)] for u in urls])
    try:
        summary = run(store)
        statuses = [files(store)[(i, 0)]["status"] for i in range(len(urls))]
        assert statuses == ["REFUSED"] * 5 + ["DOWNLOADED"]
        assert summary.failed == 5
        assert files(store)[(0, 0)]["error"] == (
            "row 1 (r0) output 0, node 9: refused to fetch file:: only http and https output URLs "
            "are downloaded")
        assert files(store)[(4, 0)]["error"].endswith("refused to fetch a URL without a scheme: only "
                                                      "http and https output URLs are downloaded")
        assert files_on_disk(store.run_dir / "files") == ["r5_9_0.png"]
        assert server.hits == Counter({"/ok": 1})
    finally:
        store.close()


def test_a_redirect_to_another_scheme_is_refused(tmp_path, server):
    def redirect(h: BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", "file:///etc/passwd")
        h.send_header("Content-Length", "0")
        h.end_headers()

    server.routes["/r"] = redirect
    store = make_run(tmp_path, [[out(server.url("/r"))]])
    try:
        run(store)
        row = files(store)[(0, 0)]
        assert row["status"] == "REFUSED" and "unsupported URL" in row["error"]
        assert server.hits["/r"] == 1
    finally:
        store.close()


def test_names_that_try_to_escape_stay_inside_files(tmp_path, server):
    body = png_bytes(2)
    url = server.serve_bytes("/e", body)
    outputs: list[list[dict[str, Any]] | None] = [
        [out(url, node="../../../../escaped")],
        [out(url, node="/tmp/abs")],
        [out(url, node="..", file_type="../png")],
        [out(url, node="9")],
    ]
    store = make_run(tmp_path, outputs, ["../../../evil", "/etc/passwd", "..", "a/../../b"])
    try:
        summary = run(store)
        assert summary.downloaded == 4
        assert files_on_disk(tmp_path) == sorted([
            "run/files/_._.._.._evil__._.._.._.._escaped_0.png",
            "run/files/_etc_passwd__tmp_abs_0.png",
            "run/files/_.__._0.png",
            "run/files/a_.._.._b_9_0.png",
            "run/state.db", "run/state.db-shm", "run/state.db-wal",
        ])
        for row in files(store).values():
            assert (store.run_dir / row["path"]).resolve().parent == (store.run_dir / "files").resolve()
    finally:
        store.close()


def test_a_planted_part_symlink_is_not_written_through(tmp_path, server):
    store = make_run(tmp_path, [[out(server.serve_bytes("/p", png_bytes(4)))]])
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (store.run_dir / "files").mkdir()
    (store.run_dir / "files" / "r0_9_0.png.part").symlink_to(victim)
    try:
        assert run(store).downloaded == 1
        assert victim.read_text() == "keep me"
        assert (store.run_dir / "files" / "r0_9_0.png").read_bytes() == png_bytes(4)
    finally:
        store.close()


def test_a_planted_files_symlink_is_refused_and_nothing_lands_outside_the_run(tmp_path, server):
    from pipeline.errors import StateError

    store = make_run(tmp_path, [[out(server.serve_bytes("/s", png_bytes(5)))]])
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.run_dir / "files").symlink_to(outside)
    try:
        with pytest.raises(StateError) as info:
            run(store)
        files_dir = store.run_dir / "files"
        assert str(info.value) == (
            f"{files_dir} is a symbolic link (to {outside}): rhbatch never writes through a link "
            "in a run directory (the write would land outside it): remove the link "
            f"(rm {files_dir}) and run the same command again")
        assert info.value.exit_code == 2
        assert list(outside.iterdir()) == [] and server.hits == Counter()
        assert files(store)[(0, 0)]["status"] == FILE_PENDING  # the row is fetched once it is fixed
        files_dir.unlink()
        assert run(store).downloaded == 1
        assert (files_dir / "r0_9_0.png").read_bytes() == png_bytes(5)
        assert list(outside.iterdir()) == []
    finally:
        store.close()


def test_a_file_in_the_way_of_files_is_refused(tmp_path, server):
    from pipeline.errors import StateError

    store = make_run(tmp_path, [[out(server.serve_bytes("/f", png_bytes(6)))]])
    (store.run_dir / "files").write_text("not a directory")
    try:
        with pytest.raises(StateError) as info:
            run(store)
        assert str(info.value) == (
            f"{store.run_dir / 'files'} is not a directory, where rhbatch saves downloads: move "
            "it away and run the same command again")
        assert (store.run_dir / "files").read_text() == "not a directory"
    finally:
        store.close()


def test_a_symlink_planted_at_a_verified_file_is_replaced_never_followed(tmp_path, server):
    store = make_run(tmp_path, [[out(server.serve_bytes("/v", png_bytes(7)))]])
    victim = tmp_path / "victim.png"
    victim.write_bytes(png_bytes(7))  # the same bytes: a link that would verify if followed
    try:
        assert run(store).downloaded == 1
        target = store.run_dir / "files" / "r0_9_0.png"
        target.unlink()
        target.symlink_to(victim)
        summary = run(store)
        assert (summary.downloaded, summary.skipped) == (1, 0)
        assert summary.errors == [
            "row 1 (r0) output 0, node 9: files/r0_9_0.png is missing (tampered, truncated or "
            "deleted); fetching it again"]
        assert not target.is_symlink() and target.read_bytes() == png_bytes(7)
        assert victim.read_bytes() == png_bytes(7)
    finally:
        store.close()


def test_colliding_names_do_not_overwrite_each_other(tmp_path, server):
    a = server.serve_bytes("/a", png_bytes(1))
    b = server.serve_bytes("/b", png_bytes(2))
    store = make_run(tmp_path, [[out(a)], [out(b)]], ["x:y", "x_y"])
    try:
        assert run(store, jobs=1).downloaded == 2
        paths = {k: r["path"] for k, r in files(store).items()}
        assert sorted(paths.values()) == ["files/x_y_9_0-0.png", "files/x_y_9_0.png"]
        for (i, _), path in paths.items():
            assert (store.run_dir / path).read_bytes() == png_bytes(i + 1)
    finally:
        store.close()


def test_a_full_disk_stops_the_pass_once_with_the_fix(tmp_path, server):
    from pipeline.errors import StorageError

    disk = tmp_path / "disk"
    disk.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
            capture_output=True).returncode != 0:
        pytest.skip("needs root and `mount -t tmpfs` (a real small filesystem to fill)")
    try:
        big = PNG_MAGIC + os.urandom(600_000)
        urls = [server.serve_bytes(f"/big{i}", big) for i in range(4)]
        store = make_run(disk, [[out(u)] for u in urls])
        try:
            with pytest.raises(StorageError) as info:
                run(store, jobs=1)
            message = str(info.value)
            assert message.startswith(f"Cannot write {store.run_dir / 'files'}/")
            assert message.endswith(".png.part: No space left on device: free some disk space, "
                                    "then run the same command again to resume")
            assert not [p for p in (store.run_dir / "files").iterdir() if p.name.endswith(".part")]
            assert sum(server.hits.values()) == 2  # the pass stopped at the file that did not fit
        finally:
            store.close()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_bodies_over_the_size_cap_are_refused(tmp_path, server):
    big = PNG_MAGIC + os.urandom(50_000 - len(PNG_MAGIC))

    def unannounced(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        for i in range(0, len(big), 4096):
            h.wfile.write(big[i:i + 4096])

    server.serve_bytes("/announced", big)
    server.routes["/unannounced"] = unannounced
    server.serve_bytes("/small", png_bytes(5))
    store = make_run(tmp_path, [[out(server.url("/announced"))], [out(server.url("/unannounced"))],
                                [out(server.url("/small"))]])
    try:
        summary = run(store, max_bytes=20_000)
        rows = files(store)
        assert [rows[(i, 0)]["status"] for i in range(3)] == ["REFUSED", "REFUSED", "DOWNLOADED"]
        assert rows[(0, 0)]["error"] == (
            "row 1 (r0) output 0, node 9: 50000 bytes exceeds the download size cap of 0.0190735 MiB: "
            "raise the cap (--max-mb) to fetch it")
        assert "the body exceeds the download size cap" in rows[(1, 0)]["error"]
        assert summary.failed == 2
        assert files_on_disk(store.run_dir / "files") == ["r2_9_0.png"]  # no .part left behind
        assert server.hits["/announced"] == 1 and server.hits["/unannounced"] == 1

        again = run(store, max_bytes=100_000)  # a larger cap lets them through
        assert again.downloaded == 2 and again.skipped == 1
        assert (store.run_dir / "files" / "r1_9_0.png").read_bytes() == big
    finally:
        store.close()


def test_planning_is_idempotent_and_follows_retried_rows(tmp_path, server):
    store = make_run(tmp_path, [[out("http://h/1"), {"text": "a caption", "fileUrl": None}],
                                [out("http://h/2"), out("http://h/3", node="10")], None])
    try:
        assert dl.plan_downloads(store) == 3
        assert dl.plan_downloads(store) == 0
        store.conn.execute("UPDATE files SET status = 'DOWNLOADED' WHERE row_idx = 0")
        store.requeue([0])
        store.mark_submitting(0)
        store.mark_submitted(0, "1900000000000000099", st.RUNNING, 2000.0)
        store.mark_success(0, [out("http://h/new")], 2100.0)
        assert dl.plan_downloads(store) == 1
        row = files(store)[(0, 0)]
        assert (row["url"], row["status"], row["url_seen_at"]) == ("http://h/new", "PENDING", 2100.0)
    finally:
        store.close()


def test_download_run_works_beside_a_running_run_and_refreshes_results(tmp_path, server):
    store = make_run(tmp_path, [[out(server.serve_bytes("/x", png_bytes(9)))]])
    store.close()
    with st.RunLock(tmp_path / "run"):  # `rhbatch run` holds the lock: downloading still works
        summary = dl.download_run(tmp_path / "run", policy=no_wait_policy()[0])
    assert summary.downloaded == 1
    record = json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[0])
    assert record["files"][0]["path"] == "files/r0_9_0.png"
    assert record["files"][0]["status"] == "DOWNLOADED"


def test_safe_names():
    assert dl.safe_part("57:35", "x") == "57_35"
    assert dl.safe_part(".hidden", "x") == "_hidden"
    assert dl.safe_part("", "out") == "out"
    assert dl.safe_ext("PNG") == "png"
    assert dl.safe_ext(None, "image/jpeg; charset=binary") == "jpg"
    assert dl.safe_ext(None, "video/mp4") == "mp4"
    assert dl.safe_ext("<>", None) == "bin"
    name = dl.file_name("r" * 300, "9", 0, "png")
    assert len(name) < 200 and name.endswith("_9_0.png")

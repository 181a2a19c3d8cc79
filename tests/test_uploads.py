"""Input files: found and checked before a run, uploaded once per content to a real loopback server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import explicit_row, no_sleep

from pipeline.client import RetryPolicy, RunningHubClient
from pipeline.config import resolve_settings
from pipeline.errors import RowFatalError
from pipeline.uploads import (
    UPLOAD_MAX_BYTES,
    UploadCache,
    find_uploads,
    substitute,
    upload_all,
)
from pipeline.workflows import load_workflow_file

DATA = Path(__file__).parent / "data" / "workflows"
I2I = "1904136902449209347"
KEY = secrets.token_hex(16)
PNG = b"\x89PNG\r\n\x1a\n" + b"pixels" * 10


def row(number: int, *overrides: tuple[str, str, Any]) -> Any:
    return explicit_row(number, *overrides, workflow_id=I2I)


@pytest.fixture(scope="module")
def workflows() -> dict[str, Any]:
    return {I2I: load_workflow_file(DATA / "img2img.json")}


class UploadServer:
    """``/task/openapi/upload`` as RunningHub answers it; counts what it receives."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str, str]] = []  # (file name, sha256, fileType)

    async def upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form["file"]
        assert form["apiKey"] == KEY and isinstance(upload, web.FileField)
        content = upload.file.read()
        if len(content) > UPLOAD_MAX_BYTES:
            return web.json_response({"code": 809, "msg": "APIKEY_FILE_SIZE_EXCEEDED", "data": None})
        sha = hashlib.sha256(content).hexdigest()
        self.received.append((upload.filename, sha, str(form["fileType"])))
        ext = Path(upload.filename).suffix.lstrip(".")
        return web.json_response(
            {"code": 0, "msg": "success", "data": {"fileName": f"api/{sha}.{ext}", "fileType": "input"}}
        )

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[RunningHubClient]:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/task/openapi/upload", self.upload)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        settings = resolve_settings(api_key=KEY, base_url=f"http://{host}:{port}", env={})

        try:
            async with RunningHubClient(
                settings, policy=RetryPolicy(max_attempts=2, sleep=no_sleep)
            ) as client:
                yield client
        finally:
            await runner.cleanup()


def name_of(content: bytes, ext: str) -> str:
    return f"api/{hashlib.sha256(content).hexdigest()}.{ext}"


# -- finding files -------------------------------------------------------------------------------


def test_find_uploads_resolves_paths_against_the_manifest_directory(tmp_path, workflows):
    manifest_dir = tmp_path / "manifests"
    (manifest_dir / "faces").mkdir(parents=True)
    (manifest_dir / "faces" / "ada.png").write_bytes(PNG)
    (manifest_dir / "bare.png").write_bytes(PNG)
    elsewhere = tmp_path / "elsewhere.wav"
    elsewhere.write_bytes(b"RIFF")
    rows = [
        row(1, ("10", "image", "@faces/ada.png"), ("6", "text", "@ada says hi")),
        row(2, ("10", "image", "bare.png"), ("12", "audio", f"@{elsewhere}")),
        row(3, ("10", "image", "api/abc.png"), ("12", "audio", "https://example.com/a.wav")),
        row(4, ("6", "text", "@faces/ada.png"), ("6", "text", "bare.png")),  # @ works in any field
    ]
    paths, problems = find_uploads(rows, manifest_dir, workflows)
    assert problems == []
    assert paths == {
        "@faces/ada.png": manifest_dir / "faces" / "ada.png",
        "bare.png": manifest_dir / "bare.png",
        f"@{elsewhere}": elsewhere,
    }
    # without workflows only @path values are files
    paths, problems = find_uploads(rows, manifest_dir, None)
    assert set(paths) == {"@faces/ada.png", f"@{elsewhere}"} and problems == []


def test_unusable_files_are_problems_with_row_and_column(tmp_path, workflows):
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    with (tmp_path / "huge.mp4").open("wb") as fh:  # sparse: no disk used
        fh.truncate(UPLOAD_MAX_BYTES + 1)
    rows = [
        row(1, ("10", "image", "missing.png")),
        row(2, ("10", "image", "@dir.png")),
        row(3, ("10", "image", "@notes.txt")),
        row(4, ("12", "audio", "@huge.mp4")),
        row(5, ("10", "image", "missing.png")),
    ]
    paths, problems = find_uploads(rows, tmp_path, workflows, bound={"face": "10.image"})
    assert paths == {}
    assert [str(p) for p in problems] == [
        f"row 1, column \"face\": file 'missing.png' not found (looked for {tmp_path / 'missing.png'}): "
        "fix the path (relative paths start at the manifest's directory), or write an http(s) URL or an "
        "api/... upload name to send it as it is",
        "row 2, column \"face\": 'dir.png' is a directory, not a file: name one file (zip a folder to "
        "send it whole)",
        "row 3, column \"face\": file 'notes.txt' has an extension RunningHub does not take (.txt): "
        "convert it to one of avi, flac, jpeg, jpg, mkv, mov, mp3, mp4, png, wav, webp, zip",
        "row 4, column \"12.audio\": file 'huge.mp4' is 30.1 MB, over RunningHub's 30 MB upload limit: "
        "shrink it, or host it yourself and write its public https URL",
        f"row 5, column \"face\": file 'missing.png' not found (looked for {tmp_path / 'missing.png'}): "
        "fix the path (relative paths start at the manifest's directory), or write an http(s) URL or an "
        "api/... upload name to send it as it is",
    ]


# -- uploading -----------------------------------------------------------------------------------


def test_one_upload_per_distinct_content_and_substitution(tmp_path, workflows):
    (tmp_path / "a.png").write_bytes(PNG)
    (tmp_path / "copy of a.png").write_bytes(PNG)  # same bytes, another name
    (tmp_path / "b.jpg").write_bytes(b"jpeg bytes")
    (tmp_path / "voice.wav").write_bytes(b"RIFF....WAVE")
    rows = [
        row(1, ("10", "image", "@a.png"), ("12", "audio", "voice.wav"), ("6", "text", "a cat")),
        row(2, ("10", "image", "copy of a.png"), ("12", "audio", "voice.wav")),
        row(3, ("10", "image", "@b.jpg"), ("12", "audio", "api/kept.wav")),
    ]
    paths, problems = find_uploads(rows, tmp_path, workflows)
    assert problems == [] and len(paths) == 4
    server = UploadServer()
    cache = UploadCache(tmp_path / "run" / "uploads.json")

    async def go() -> dict[str, str]:
        async with server.serving() as client:
            return await upload_all(client, paths, cache, jobs=3)

    mapping = asyncio.run(go())
    assert sorted(sha for _, sha, _ in server.received) == sorted(
        hashlib.sha256(c).hexdigest() for c in (PNG, b"jpeg bytes", b"RIFF....WAVE")
    )
    assert {t for _, _, t in server.received} == {"input"}
    png_name = mapping["@a.png"]
    assert png_name in (name_of(PNG, "png"),) and mapping["copy of a.png"] == png_name
    assert mapping["@b.jpg"] == name_of(b"jpeg bytes", "jpg")
    assert mapping["voice.wav"] == name_of(b"RIFF....WAVE", "wav")
    assert substitute(rows[0].node_info_list, mapping) == (
        {"nodeId": "10", "fieldName": "image", "fieldValue": png_name},
        {"nodeId": "12", "fieldName": "audio", "fieldValue": mapping["voice.wav"]},
        {"nodeId": "6", "fieldName": "text", "fieldValue": "a cat"},
    )
    assert substitute(rows[2].node_info_list, mapping)[1]["fieldValue"] == "api/kept.wav"
    saved = json.loads((tmp_path / "run" / "uploads.json").read_text())
    assert saved["version"] == 1 and len(saved["uploads"]) == 3
    assert saved["uploads"][hashlib.sha256(PNG).hexdigest()]["size"] == len(PNG)


def test_cache_is_reused_across_calls_and_expires_after_retention(tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    (tmp_path / "b.png").write_bytes(PNG + b"!")
    paths = {"@a.png": tmp_path / "a.png", "@b.png": tmp_path / "b.png"}
    now = [1_000_000.0]
    server = UploadServer()

    def cache() -> UploadCache:  # a fresh object each time: reuse must survive a restart
        return UploadCache(tmp_path / "uploads.json", retention_s=3600, clock=lambda: now[0])

    async def go() -> list[dict[str, str]]:
        out = []
        async with server.serving() as client:
            out.append(await upload_all(client, paths, cache()))
            now[0] += 3599
            out.append(await upload_all(client, paths, cache()))
            now[0] += 2  # the first uploads are now older than the retention
            out.append(await upload_all(client, paths, cache()))
            out.append(await upload_all(client, paths, cache()))
        return out

    first, reused, renewed, reused_again = asyncio.run(go())
    assert len(server.received) == 4  # two files, uploaded twice each: at the start and after expiry
    assert first == reused == renewed == reused_again
    entry = json.loads((tmp_path / "uploads.json").read_text())["uploads"][hashlib.sha256(PNG).hexdigest()]
    assert entry["uploaded_at"] == 1_000_000.0 + 3601


def test_a_changed_file_is_hashed_and_uploaded_again(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    server = UploadServer()
    cache = UploadCache(tmp_path / "uploads.json")

    async def go() -> tuple[dict[str, str], dict[str, str]]:
        async with server.serving() as client:
            before = await upload_all(client, {"@a.png": path}, cache)
            path.write_bytes(PNG + b"edited")
            after = await upload_all(client, {"@a.png": path}, cache)
            return before, after

    before, after = asyncio.run(go())
    assert before != after and len(server.received) == 2


def test_server_size_refusal_is_a_row_fatal_error(tmp_path):
    big = tmp_path / "big.mp4"
    with big.open("wb") as fh:
        fh.truncate(UPLOAD_MAX_BYTES + 1)
    server = UploadServer()

    async def go() -> None:
        async with server.serving() as client:
            await upload_all(client, {"@big.mp4": big}, UploadCache(tmp_path / "uploads.json"))

    with pytest.raises(RowFatalError, match="809 APIKEY_FILE_SIZE_EXCEEDED") as info:
        asyncio.run(go())
    assert info.value.code == 809 and server.received == []
    assert json.loads((tmp_path / "uploads.json").read_text())["uploads"] == {}

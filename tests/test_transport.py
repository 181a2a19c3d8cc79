"""The HTTP stack under the client, over real sockets on loopback: both stacks (aiohttp's pool, the
default, and httpx's own) must tell "never sent" from "maybe sent" the same way, because that is
what decides whether a create may be retried or must become SUBMIT_UNKNOWN."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import secrets
import ssl
import sys
from collections.abc import Awaitable, Callable

import pytest
import trustme
from conftest import closed_port, no_sleep

from pipeline.client import RetryPolicy, RunningHubClient
from pipeline.config import ConfigError, resolve_settings
from pipeline.errors import ApiConnectionError, SubmitUnknownError
from pipeline.transport import LOOP_ENV, loop_factory, run_async

KEY = secrets.token_hex(16)
STACKS = ("aiohttp", "httpx")
# ``rhbatch run`` drives the client on uvloop where it is installed (transport.run_async): the
# mapping of failures must hold on both loops
LOOPS = ("asyncio", "uvloop")
CREATE = {"workflowId": "1904136902449209346", "nodeInfoList": []}

Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Wire:
    """A raw HTTP/1.1 listener: records every request it reads, then does what ``reply`` says."""

    def __init__(self, reply: Reply, *, tls: ssl.SSLContext | None = None):
        self.reply = reply
        self.tls = tls
        self.requests: list[tuple[bytes, bytes]] = []  # (head, body)
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Wire:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        assert self.server is not None
        scheme = "https" if self.tls else "http"
        return f"{scheme}://localhost:{self.server.sockets[0].getsockname()[1]}"

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await reader.readexactly(length)
        self.requests.append((head, body))
        return head

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self.read_request(reader) is not None:
                await self.reply(reader, writer)
                if writer.is_closing():
                    break
        finally:
            writer.close()


def http_answer(body: bytes, *, status: str = "200 OK", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def answering(payload: bytes) -> Reply:
    async def reply(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        await writer.drain()

    return reply


async def hang(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
    await reader.read()  # say nothing until the client gives up and closes


async def drop(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


CREATED = json.dumps({"code": 0, "msg": "success", "data": {
    "taskId": "1910246754753896450", "taskStatus": "QUEUED", "clientId": "c" * 32,
    "netWssUrl": None, "promptTips": "{}"}}).encode()
ACCOUNT = json.dumps({"code": 0, "msg": "success", "data": {
    "remainCoins": "10", "currentTaskCounts": "3", "remainMoney": None, "currency": None,
    "apiType": "NORMAL"}}).encode()


def on_loop(loop: str, go: Callable[[], Awaitable[None]]) -> None:
    """``go()`` to its end on the named event loop, the way ``rhbatch run`` runs (run_async)."""
    if loop == "asyncio":
        asyncio.run(go())  # type: ignore[arg-type]
        return
    pytest.importorskip("uvloop")
    assert os.environ.get(LOOP_ENV, "") != "asyncio" and loop_factory() is not None

    async def checked() -> None:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        await go()

    run_async(checked())


def client(stack: str, url: str, **settings: float) -> RunningHubClient:
    resolved = resolve_settings(api_key=KEY, base_url=url, env={}, http_transport=stack,
                                read_timeout_s=settings.get("read_timeout_s", 5.0),
                                connect_timeout_s=settings.get("connect_timeout_s", 5.0))
    return RunningHubClient(resolved, policy=RetryPolicy(max_attempts=3, sleep=no_sleep))


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("stack", STACKS)
def test_a_refused_connection_is_never_sent_so_create_retries_it(loop, stack):
    async def go() -> None:
        async with client(stack, f"http://127.0.0.1:{closed_port()}") as rh:
            with pytest.raises(ApiConnectionError) as caught:
                await rh.create(CREATE)
            assert caught.value.sent is False
            assert not isinstance(caught.value, SubmitUnknownError)
            assert rh.requests_sent == 3  # every attempt of the policy, since none could have landed

    on_loop(loop, go)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("fault", ["silence", "dropped", "not http"])
def test_a_create_that_reached_the_server_without_an_answer_is_unknown_and_sent_once(loop, stack, fault):
    reply = {"silence": hang, "dropped": drop, "not http": answering(b"HELLO\r\n\r\n")}[fault]

    async def go() -> None:
        async with Wire(reply) as wire, client(stack, wire.url, read_timeout_s=0.5) as rh:
            with pytest.raises(SubmitUnknownError):
                await rh.create(CREATE)
            assert len(wire.requests) == 1
            head, body = wire.requests[0]
            assert head.startswith(b"POST /task/openapi/create HTTP/1.1\r\n")
            assert json.loads(body)["workflowId"] == CREATE["workflowId"]

    on_loop(loop, go)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("stack", STACKS)
def test_an_answer_arrives_whole_with_the_key_only_where_it_belongs(loop, stack):
    async def go() -> None:
        async with Wire(answering(http_answer(CREATED))) as wire, client(stack, wire.url) as rh:
            first = await rh.create(CREATE)
            second = await rh.create(CREATE)
            assert first.task_id == second.task_id == "1910246754753896450"
            assert len(wire.requests) == 2
            head, body = wire.requests[0]
            lines = head.decode().lower().split("\r\n")
            assert f"authorization: bearer {KEY}" in lines
            assert "user-agent: rhbatch" in lines
            assert json.loads(body) == {"apiKey": KEY, **CREATE}

    on_loop(loop, go)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("stack", STACKS)
def test_a_gzip_answer_is_decoded_once(loop, stack):
    packed = http_answer(gzip.compress(ACCOUNT), headers={"Content-Encoding": "gzip"})

    async def go() -> None:
        async with Wire(answering(packed)) as wire, client(stack, wire.url) as rh:
            status = await rh.account_status()
            assert status.current_task_counts == 3

    on_loop(loop, go)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("stack", STACKS)
def test_a_redirect_is_not_followed(loop, stack):
    moved = http_answer(b"", status="302 Found", headers={"Location": "http://127.0.0.1:9/elsewhere"})

    async def go() -> None:
        async with Wire(answering(moved)) as wire, client(stack, wire.url) as rh:
            with pytest.raises(SubmitUnknownError, match="HTTP 302"):
                await rh.create(CREATE)
            assert len(wire.requests) == 1

    on_loop(loop, go)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("stack", STACKS)
def test_tls_trusts_what_httpx_trusts_and_an_untrusted_certificate_is_never_sent(loop, stack, tmp_path,
                                                                                  monkeypatch):
    authority = trustme.CA()
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(served)
    bundle = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(bundle))

    async def go() -> None:
        async with Wire(answering(http_answer(CREATED)), tls=served) as wire:
            monkeypatch.delenv("SSL_CERT_FILE", raising=False)
            monkeypatch.delenv("SSL_CERT_DIR", raising=False)
            async with client(stack, wire.url) as rh:  # a private CA nobody trusts
                with pytest.raises(ApiConnectionError) as caught:
                    await rh.create(CREATE)
                assert caught.value.sent is False and not isinstance(caught.value, SubmitUnknownError)
            assert wire.requests == []
            monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
            async with client(stack, wire.url) as rh:
                assert (await rh.create(CREATE)).task_id == "1910246754753896450"
            assert len(wire.requests) == 1

    on_loop(loop, go)


def test_the_proxy_from_the_environment_is_used_unless_no_proxy_names_the_host(monkeypatch):
    """What httpx does with HTTP_PROXY and NO_PROXY, the aiohttp stack does too."""

    async def go() -> None:
        async with Wire(answering(http_answer(ACCOUNT))) as proxy, \
                Wire(answering(http_answer(ACCOUNT))) as direct:
            port = direct.url.rsplit(":", 1)[1]
            proxy_url = proxy.url
            monkeypatch.setenv("HTTP_PROXY", proxy_url)
            monkeypatch.setenv("NO_PROXY", "")
            async with client("aiohttp", f"http://localhost:{port}") as rh:
                await rh.account_status()
            assert len(proxy.requests) == 1 and not direct.requests
            assert proxy.requests[0][0].startswith(
                f"POST http://localhost:{port}/uc/openapi/accountStatus HTTP/1.1".encode())
            monkeypatch.setenv("NO_PROXY", "localhost")
            async with client("aiohttp", f"http://localhost:{port}") as rh:
                await rh.account_status()
            assert len(proxy.requests) == 1 and len(direct.requests) == 1

    asyncio.run(go())


def test_an_unknown_stack_is_a_config_error_naming_the_variable():
    with pytest.raises(ConfigError, match="RHBATCH_HTTP='curl' is not a known HTTP stack: use one of "
                                          "aiohttp, httpx"):
        resolve_settings(api_key=KEY, env={"RHBATCH_HTTP": "curl"})
    assert resolve_settings(api_key=KEY, env={"RHBATCH_HTTP": "httpx"}).http_transport == "httpx"
    assert resolve_settings(api_key=KEY, env={}).http_transport == "aiohttp"


def test_a_run_is_driven_by_uvloop_unless_told_otherwise_or_it_is_missing(monkeypatch):
    pytest.importorskip("uvloop")

    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    monkeypatch.delenv(LOOP_ENV, raising=False)
    assert run_async(which()) == "uvloop"
    monkeypatch.setenv(LOOP_ENV, "asyncio")  # the opt-out
    assert loop_factory() is None and run_async(which()) == "asyncio"
    monkeypatch.setenv(LOOP_ENV, "uvloop")
    assert run_async(which()) == "uvloop"
    monkeypatch.setitem(sys.modules, "uvloop", None)  # a platform without uvloop: import fails
    assert loop_factory() is None and run_async(which()) == "asyncio"


def chunked(body: bytes, *, extra: dict[str, str] | None = None, piece: int = 1 << 20) -> bytes:
    lines = ["HTTP/1.1 200 OK", "Transfer-Encoding: chunked", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    out = [("\r\n".join(lines) + "\r\n\r\n").encode()]
    for at in range(0, len(body), piece):
        part = body[at:at + piece]
        out.append(f"{len(part):x}\r\n".encode() + part + b"\r\n")
    return b"".join(out) + b"0\r\n\r\n"


BIG = b'{"code":0,"msg":"' + b"x" * (9 << 20) + b'","data":{"taskId":"1"}}'


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("shape", ["announced", "chunked", "length and chunked"])
def test_an_answer_past_the_cap_is_refused_however_it_is_framed(loop, shape):
    """8 MiB is the bound whether the answer announces its size, streams it in chunks, or
    announces a small size while streaming a large one (the chunks are what count)."""
    small = {"Content-Length": "40"}
    payload = {"announced": http_answer(BIG), "chunked": chunked(BIG),
               "length and chunked": chunked(BIG, extra=small)}[shape]

    async def go() -> None:
        async with Wire(answering(payload)) as wire, client("aiohttp", wire.url) as rh:
            with pytest.raises(SubmitUnknownError) as caught:
                await rh.create(CREATE)
            assert len(wire.requests) == 1
            assert KEY not in str(caught.value)
            if shape != "length and chunked":  # refused as a protocol error is as good
                assert "larger than 8 MiB" in str(caught.value)

    on_loop(loop, go)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_chunked_answer_within_the_cap_arrives_whole(loop):
    async def go() -> None:
        async with Wire(answering(chunked(CREATED, piece=7))) as wire, \
                client("aiohttp", wire.url) as rh:
            assert (await rh.create(CREATE)).task_id == "1910246754753896450"
            assert (await rh.create(CREATE)).task_id == "1910246754753896450"  # kept alive
            assert len(wire.requests) == 2

    on_loop(loop, go)

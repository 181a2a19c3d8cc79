"""An httpx transport that sends over an aiohttp connection pool.

rhbatch speaks httpx everywhere (requests, responses, errors, test transports), but httpx's own
pool (httpcore + h11) re-scans its connections for every request: measured against the simulator,
one POST cost 1.9 ms of client CPU alone and 3.5-4.7 ms with 20-200 in flight, against about 1 ms
at any depth over aiohttp's pool. ``bench/run_bench.py`` prints the whole-run ratio per task
(1.81x in the latest table).

What a caller can rely on is httpx's contract, and the create path depends on one part of it:
an exception says whether the request could have reached the service.

- ``httpx.ConnectError`` / ``httpx.ConnectTimeout``: no connection was made (refused, DNS, TLS,
  proxy, connect or pool timeout): nothing was sent.
- ``httpx.ReadTimeout``, ``httpx.RemoteProtocolError``, ``httpx.ReadError``: the request was, or
  may have been, written. Anything aiohttp raises that is not a connect failure lands here, so an
  error this module has never seen is treated as "maybe sent", never as "safe to resend".

aiohttp never resends a POST by itself (it retries a dropped keep-alive connection only for
idempotent methods), and every RunningHub call is a POST. Proxies come from the same environment
variables httpx reads (``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``, ``NO_PROXY``); ``.netrc`` is
not consulted, since the key travels in the request itself. TLS trusts the certificates httpx
trusts. ``RHBATCH_HTTP=httpx`` switches back to httpx's own pool.

The client's hot path (every JSON call: creates, polls, account reads) skips httpx's request and
response models altogether and calls :meth:`AiohttpTransport.send` with the body already encoded;
it raises the same httpx exceptions, so the never-sent / maybe-sent mapping above is one mapping
for both ways in. Uploads and anything else go through httpx as before.

:func:`run_async` runs a whole ``rhbatch run`` on uvloop where it is installed (a create and
its polls cost about a quarter less client CPU than on asyncio's own loop, measured against the
simulator); ``RHBATCH_LOOP=asyncio`` keeps asyncio's loop, and so does a platform without uvloop.
"""

from __future__ import annotations

import asyncio
import io
import os
import urllib.request
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

import aiohttp
import httpx
import yarl

from pipeline.errors import AnswerTooLarge

# Header names httpx sets that aiohttp must compute itself from what it actually sends.
_HOP_BY_HOP = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive"})
LARGE_BODY = 256 * 1024  # uploads; every API call is a few hundred bytes of JSON
KEEPALIVE_S = 5.0  # as httpx: an idle connection is dropped before a typical server closes it

LARGE_BODY_BYTES = 1 << 20  # bodies this large are streamed from a buffer
LOOP_ENV = "RHBATCH_LOOP"  # "asyncio" keeps asyncio's own event loop
T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop, unless ``RHBATCH_LOOP=asyncio`` or uvloop is not installed (then None:
    asyncio's own loop)."""
    if os.environ.get(LOOP_ENV, "").strip().lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:  # optional (no wheel on Windows): asyncio's loop does the same, slower
        return None
    return uvloop.new_event_loop


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop :func:`loop_factory` picks."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One aiohttp ``ClientSession`` (opened lazily in the running loop) behind httpx's API."""

    def __init__(self, *, max_connections: int, keepalive_s: float = KEEPALIVE_S):
        self._max_connections = max_connections
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None
        self._proxies = urllib.request.getproxies()
        self._proxy_for: dict[tuple[str, str], str | None] = {}
        self._urls: dict[str, yarl.URL] = {}

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, limit_per_host=0, keepalive_timeout=self._keepalive_s,
            # the certificates httpx trusts (certifi, or SSL_CERT_FILE / SSL_CERT_DIR), not only
            # the system store, which slim images often lack
            ssl=httpx.create_ssl_context(),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # httpx decodes by Content-Encoding, as for any transport
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,  # proxies are resolved here, .netrc is never read
        )
        return self._session

    def _proxy(self, url: httpx.URL) -> str | None:
        return self.proxy_for(url.scheme, url.host)

    def proxy_for(self, scheme: str, host: str) -> str | None:
        """The proxy for ``scheme://host`` from the environment, as httpx picks it (or None)."""
        slot = (scheme, host)
        if slot not in self._proxy_for:
            proxy = self._proxies.get(scheme) or self._proxies.get("all")
            if proxy and urllib.request.proxy_bypass(host):
                proxy = None
            self._proxy_for[slot] = proxy or None
        return self._proxy_for[slot]

    @staticmethod
    def timeouts(*, connect_s: float | None, read_s: float | None,
                 pool_s: float | None) -> aiohttp.ClientTimeout:
        """httpx's timeouts as aiohttp's (make it once and pass it to :meth:`send`)."""
        return aiohttp.ClientTimeout(
            total=None,
            # waiting for a free pooled connection and opening one: nothing has been sent yet
            connect=None if connect_s is None else connect_s + (pool_s or 0.0),
            sock_connect=connect_s,
            sock_read=read_s,
        )

    async def send(self, method: str, url: str, body: bytes | None, headers: Mapping[str, str],
                   timeout: aiohttp.ClientTimeout, *, max_bytes: int,
                   proxy: str | None = None) -> tuple[int, Mapping[str, str], bytes]:
        """One request without httpx's models: (status, headers, raw body read within
        ``max_bytes``). Raises what :meth:`handle_async_request` raises for the same failure."""
        session = self._session or self._open()
        # aiohttp warns (a ResourceWarning) on raw bytes of 1 MiB or more: it writes them in one go
        data: bytes | io.BytesIO | None = (
            io.BytesIO(body) if body is not None and len(body) >= LARGE_BODY_BYTES else body)
        target = self._urls.get(url)
        if target is None:  # parsed once per route, not once per request
            target = self._urls[url] = yarl.URL(url)
        try:
            async with session.request(method, target, data=data, headers=headers,
                                       allow_redirects=False, timeout=timeout,
                                       proxy=proxy) as answer:
                return answer.status, answer.headers, await _read_body(answer, max_bytes)
        except (aiohttp.ClientError, OSError) as exc:
            raise _translated(exc, None) from exc

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        limits: dict[str, Any] = request.extensions.get("timeout", {})
        timeout = self.timeouts(connect_s=limits.get("connect"), read_s=limits.get("read"),
                                pool_s=limits.get("pool"))
        headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() not in _HOP_BY_HOP]
        body = await request.aread()
        try:
            async with session.request(
                request.method,
                str(request.url),
                # aiohttp writes a large bytes body in one blocking call; a file object in pieces
                data=(io.BytesIO(body) if len(body) > LARGE_BODY else body) if body else None,
                headers=headers,
                allow_redirects=False,
                timeout=timeout,
                proxy=self._proxy(request.url),
            ) as answer:
                content = await _read_body(answer, request.extensions.get("rhbatch_max_bytes"),
                                           request)
                version = answer.version or aiohttp.HttpVersion11
                return httpx.Response(
                    answer.status,
                    headers=list(answer.raw_headers),
                    # a stream, not content=: httpx would decode bytes at once, with no bound;
                    # the client reads the raw body and decodes it within its cap
                    stream=_RawBody(content),
                    request=request,
                    extensions={"reason_phrase": (answer.reason or "").encode("latin-1", "replace"),
                                "http_version": f"HTTP/{version.major}.{version.minor}".encode()},
                )
        except (aiohttp.ClientError, OSError) as exc:
            raise _translated(exc, request) from exc

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class _RawBody(httpx.AsyncByteStream):
    """A body already read (within the cap), handed to httpx undecoded."""

    def __init__(self, data: bytes):
        self._data = data

    async def __aiter__(self):  # type: ignore[override]
        yield self._data


async def _read_body(answer: aiohttp.ClientResponse, cap: int | None,
                     request: httpx.Request | None = None) -> bytes:
    """The raw body, refused past ``cap`` (announced or as it arrives); no cap: read whole."""
    if cap is None:
        return await answer.read()
    length = answer.content_length
    if length is not None and length > cap:
        raise AnswerTooLarge(f"answer announces {length} bytes", request=request)
    if length is not None and "Transfer-Encoding" not in answer.headers:
        # the parser hands over exactly the announced bytes, no more: read in one go
        return await answer.read()
    chunks: list[bytes] = []
    size = 0
    async for chunk in answer.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > cap:
            raise AnswerTooLarge(f"answer over {cap} bytes", request=request)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _translated(exc: BaseException, request: httpx.Request | None) -> httpx.TransportError:
    """aiohttp's exception as httpx's: a connect failure means nothing was written; anything
    else, including what this module has never seen, may have been sent."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):  # sock_connect or pool + connect
        return httpx.ConnectTimeout(text, request=request)
    if isinstance(exc, aiohttp.ClientConnectorError):  # refused, DNS, TLS, proxy: nothing written
        return httpx.ConnectError(text, request=request)
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return httpx.ReadTimeout(text, request=request)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientResponseError):
        return httpx.RemoteProtocolError(text, request=request)
    if isinstance(exc, TimeoutError):  # any other deadline (TimeoutError is also an OSError)
        return httpx.ReadTimeout(text, request=request)
    return httpx.ReadError(text, request=request)  # reset, payload cut short, anything else

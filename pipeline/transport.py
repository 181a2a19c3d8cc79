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
"""

from __future__ import annotations

import io
import urllib.request
from typing import Any

import aiohttp
import httpx

from pipeline.client import AnswerTooLarge

# Header names httpx sets that aiohttp must compute itself from what it actually sends.
_HOP_BY_HOP = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive"})
LARGE_BODY = 256 * 1024  # uploads; every API call is a few hundred bytes of JSON
KEEPALIVE_S = 5.0  # as httpx: an idle connection is dropped before a typical server closes it


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One aiohttp ``ClientSession`` (opened lazily in the running loop) behind httpx's API."""

    def __init__(self, *, max_connections: int, keepalive_s: float = KEEPALIVE_S):
        self._max_connections = max_connections
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None
        self._proxies = urllib.request.getproxies()
        self._proxy_for: dict[tuple[str, str], str | None] = {}

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
        host = url.host
        slot = (url.scheme, host)
        if slot not in self._proxy_for:
            proxy = self._proxies.get(url.scheme) or self._proxies.get("all")
            if proxy and urllib.request.proxy_bypass(host):
                proxy = None
            self._proxy_for[slot] = proxy or None
        return self._proxy_for[slot]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        limits: dict[str, Any] = request.extensions.get("timeout", {})
        connect = limits.get("connect")
        pool = limits.get("pool")
        timeout = aiohttp.ClientTimeout(
            total=None,
            # waiting for a free pooled connection and opening one: nothing has been sent yet
            connect=None if connect is None else connect + (pool or 0.0),
            sock_connect=connect,
            sock_read=limits.get("read"),
        )
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
                content = await _read_body(answer, request)
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
        except aiohttp.ConnectionTimeoutError as exc:  # sock_connect or pool + connect
            raise httpx.ConnectTimeout(_say(exc), request=request) from exc
        except aiohttp.ClientConnectorError as exc:  # refused, DNS, TLS, proxy: nothing written
            raise httpx.ConnectError(_say(exc), request=request) from exc
        except aiohttp.SocketTimeoutError as exc:
            raise httpx.ReadTimeout(_say(exc), request=request) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientResponseError) as exc:
            raise httpx.RemoteProtocolError(_say(exc), request=request) from exc
        except TimeoutError as exc:  # any other deadline (TimeoutError is also an OSError)
            raise httpx.ReadTimeout(_say(exc), request=request) from exc
        except (aiohttp.ClientError, OSError) as exc:  # reset, payload cut short, anything else
            raise httpx.ReadError(_say(exc), request=request) from exc

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


async def _read_body(answer: aiohttp.ClientResponse, request: httpx.Request) -> bytes:
    """The raw body, refused past the caller's ``rhbatch_max_bytes`` (announced or as it arrives)."""
    cap = request.extensions.get("rhbatch_max_bytes")
    if cap is None:
        return await answer.read()
    if answer.content_length is not None and answer.content_length > cap:
        raise AnswerTooLarge(f"answer announces {answer.content_length} bytes", request=request)
    chunks: list[bytes] = []
    size = 0
    async for chunk in answer.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > cap:
            raise AnswerTooLarge(f"answer over {cap} bytes", request=request)
        chunks.append(chunk)
    return b"".join(chunks)


def _say(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__

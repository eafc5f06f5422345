"""One HTTP POST to a receiver, bounded in every direction.

Short timeouts (a slow receiver never holds a sender for long), no redirects followed (a
redirect could lead to an address the URL check refused), a connection only to an address
checked as it is made (unless private addresses are allowed), and the response body read up to
`MAX_RESPONSE_BYTES` (a receiver that sends a huge body costs nothing). Any outcome, garbage
included, comes back as a `Response`, never as an exception.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from creditworker.contract.errors import InvalidWebhookUrl
from creditworker.notifications.webhooks.addresses import public_addresses

MAX_RESPONSE_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Response:
    status: int | None
    """None when no HTTP answer came (refused, timed out, not HTTP)."""
    body: str | None
    error: str | None
    duration_ms: int


LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)


class _PublicOnly(httpcore.NetworkBackend):
    """Connects to the address it resolved and checked itself, never to what the name
    resolves to a moment later: the Host header and TLS's server name stay the URL's."""

    def __init__(self) -> None:
        self.backend = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None, socket_options: Any = None) -> httpcore.NetworkStream:
        try:
            address = public_addresses(host, port)[0]
        except InvalidWebhookUrl as exc:
            raise httpcore.ConnectError(exc.message) from None
        return self.backend.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                        socket_options=socket_options)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("a webhook never goes to a unix socket")

    def sleep(self, seconds: float) -> None:
        self.backend.sleep(seconds)


def client(timeout_seconds: float, *, allow_private: bool = False) -> httpx.Client:
    """A client for many sends: keep-alive connections, no redirects, no proxies from the
    environment (a delivery goes where its URL says), and unless `allow_private`, each new
    connection made to a public address checked as it is made."""
    transport = httpx.HTTPTransport(limits=LIMITS, trust_env=False)
    if not allow_private:
        # httpx does not take a network backend; its pool is rebuilt here with one
        # (tests/notifications/test_webhooks_pinning.py fails if httpx stops using it).
        transport._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=LIMITS.max_connections, max_keepalive_connections=LIMITS.max_keepalive_connections,
            keepalive_expiry=LIMITS.keepalive_expiry, network_backend=_PublicOnly(),
        )
    return httpx.Client(
        timeout=httpx.Timeout(timeout_seconds, connect=min(timeout_seconds, 3.0)),
        follow_redirects=False, trust_env=False, transport=transport,
        headers={"user-agent": "creditworker-webhooks/1"},
    )


def post(http: httpx.Client, url: str, body: bytes, headers: dict[str, str], *, deadline_seconds: float) -> Response:
    """POST `body`; the answer's status and its first bytes, or why there was none. Reading
    stops at `deadline_seconds` even if the receiver trickles bytes slower than the timeout."""
    started = time.perf_counter()
    try:
        with http.stream("POST", url, content=body, headers=headers) as answer:
            received = bytearray()
            for chunk in answer.iter_raw():
                received.extend(chunk)
                if len(received) >= MAX_RESPONSE_BYTES or time.perf_counter() - started > deadline_seconds:
                    break
            text = bytes(received[:MAX_RESPONSE_BYTES]).decode("utf-8", "replace")
            return Response(answer.status_code, text, None, _ms(started))
    except httpx.TimeoutException as exc:
        return Response(None, None, f"timed out ({type(exc).__name__})", _ms(started))
    except (httpx.HTTPError, OSError, ValueError) as exc:
        return Response(None, None, f"{type(exc).__name__}: {exc}"[:500], _ms(started))


def _ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)

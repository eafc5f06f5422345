"""One HTTP POST to a receiver, bounded in every direction.

Short timeouts (a slow receiver never holds a sender for long), no redirects followed (a
redirect could lead to an address the URL check refused), and the response body read up to
`MAX_RESPONSE_BYTES` (a receiver that sends a huge body costs nothing). Any outcome, garbage
included, comes back as a `Response`, never as an exception.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

MAX_RESPONSE_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Response:
    status: int | None
    """None when no HTTP answer came (refused, timed out, not HTTP)."""
    body: str | None
    error: str | None
    duration_ms: int


def client(timeout_seconds: float) -> httpx.Client:
    """A client for many sends: keep-alive connections, no redirects, no proxies from the
    environment (a delivery goes where its URL says)."""
    return httpx.Client(
        timeout=httpx.Timeout(timeout_seconds, connect=min(timeout_seconds, 3.0)),
        follow_redirects=False, trust_env=False,
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
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

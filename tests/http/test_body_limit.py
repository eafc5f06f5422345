"""The gateway's body cap and the order of its checks, on a real uvicorn server (`creditworker
serve`) in front of a real worker: a stranger or an oversized body is answered before the body
has been sent, so the gateway never holds it."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import Iterator

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from creditworker.http.body_limit import BodyLimit
from tests.e2e.conftest import RunningWorker, serving
from tests.services import free_port

pytestmark = pytest.mark.e2e

REDIS_DB = 5
"""Redis database of this module's broker (the `worker` fixture in conftest reads it)."""

API_KEY = "body-limit-test-key"
LIMIT = 64 * 1024
"""CREDITWORKER_HTTP_MAX_BODY_BYTES of the server under test."""
HUGE = 100 * 1024 * 1024
"""What the requests below declare: 100 MiB, of which they send at most a few chunks."""
CHUNK = 16 * 1024
ANSWER_WITHIN = 5.0
"""Seconds a refusal may take; a server that waits for the whole body never answers."""


@pytest.fixture(scope="module")
def gateway(worker: RunningWorker) -> Iterator[str]:
    """`creditworker serve` on the worker's broker and database; yields its base URL."""
    port = free_port()
    env = {
        **worker.env,
        "CREDITWORKER_RESULT_BACKEND": worker.result_backend,
        "CREDITWORKER_API_KEYS": API_KEY,
        "CREDITWORKER_HTTP_MAX_BODY_BYTES": str(LIMIT),
    }
    yield from serving(env, worker.workdir, port, "/openapi.json")


def head(path: str, port: int, *, key: str | None, framing: str) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"{auth}{framing}\r\n\r\n"
    ).encode()


def answer_to_a_partial_body(
    base_url: str, *, key: str | None, chunked: bool, chunks: int
) -> tuple[int, dict[str, object]]:
    """Declare a 100 MiB body (or a chunked one), send only `chunks` chunks of it and wait for
    the answer: the status and JSON body, with no more bytes of the body ever sent. The server
    must then close the connection rather than read the rest of the body."""
    port = int(base_url.rsplit(":", 1)[1])
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {HUGE}"
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_WITHIN) as connection:
        connection.sendall(head("/credits/add", port, key=key, framing=framing))
        piece = b"x" * CHUNK
        for _ in range(chunks):
            connection.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        received = b""
        while b"\r\n\r\n" not in received or not _complete(received):
            data = connection.recv(65536)  # socket.timeout fails the test: no answer
            assert data, f"the server closed without answering: {received!r}"
            received += data
        assert _closed_after_the_answer(connection), "the server went on reading the body"
    status_line, _, rest = received.partition(b"\r\n")
    body = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split()[1]), json.loads(body)


def _closed_after_the_answer(connection: socket.socket) -> bool:
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:
        return True


def _complete(response: bytes) -> bool:
    headers, _, body = response.partition(b"\r\n\r\n")
    for line in headers.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


# ------------------------------------------------------------------ over real HTTP


def test_a_request_without_a_key_is_401_before_its_body_is_sent(gateway: str) -> None:
    for chunked in (False, True):
        # not one byte of the body is sent: the answer must come from the headers alone (a
        # server this quick closes before chunks sent after its answer could arrive)
        status, body = answer_to_a_partial_body(gateway, key=None, chunked=chunked, chunks=0)
        assert (status, body["error"]["code"]) == (401, "unauthorized"), body  # type: ignore[index]


def test_a_declared_body_over_the_limit_is_413_before_it_is_sent(gateway: str) -> None:
    status, body = answer_to_a_partial_body(gateway, key=API_KEY, chunked=False, chunks=0)
    assert (status, body["error"]) == (413, {  # type: ignore[index]
        "code": "content_too_large",
        "message": f"the request body is larger than {LIMIT} bytes, the most the gateway "
                   "reads (CREDITWORKER_HTTP_MAX_BODY_BYTES)",
        "details": {"max_body_bytes": LIMIT},
    })


def test_a_chunked_body_is_413_once_it_passes_the_limit(gateway: str) -> None:
    """The chunks just past the limit are sent, never the end of the body."""
    past_the_limit = LIMIT // CHUNK + 1
    status, body = answer_to_a_partial_body(
        gateway, key=API_KEY, chunked=True, chunks=past_the_limit
    )
    assert (status, body["error"]["code"]) == (413, "content_too_large")  # type: ignore[index]


def test_bodies_within_the_limit_reach_the_workers(gateway: str, worker: RunningWorker) -> None:
    user = f"user-{uuid.uuid4().hex[:12]}"
    description = "d" * 400
    payload = json.dumps({"user_id": user, "amount": 7, "description": description}).encode()

    def in_chunks() -> Iterator[bytes]:
        yield from (payload[i:i + 100] for i in range(0, len(payload), 100))

    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    with httpx.Client(base_url=gateway, headers=headers, timeout=20) as http:
        declared = http.post("/credits/add?wait=true", content=payload)
        chunked = http.post("/credits/add?wait=true", content=in_chunks())
    assert declared.status_code == chunked.status_code == 200, (declared.text, chunked.text)
    assert [declared.json()["balance_after"], chunked.json()["balance_after"]] == [7, 14]
    assert worker.service.get_user_credits_info(user).total == 14


# ------------------------------------------------------------------ the middleware alone


class Recorder:
    """An app that reads the whole body, and a client that streams 1 MiB in 16 KiB chunks."""

    def __init__(self) -> None:
        self.chunks_sent = 0
        self.app_body: bytes | None = None
        self.status: int | None = None

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.app_body = body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive(self) -> Message:
        self.chunks_sent += 1
        more = self.chunks_sent < 64
        return {"type": "http.request", "body": b"x" * CHUNK, "more_body": more}

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]


def scope_with(headers: list[tuple[bytes, bytes]]) -> Scope:
    return {"type": "http", "method": "POST", "path": "/credits/add", "headers": headers}


def run(recorder: Recorder, headers: list[tuple[bytes, bytes]], max_body_bytes: int) -> None:
    limited = BodyLimit(recorder.app, max_body_bytes=max_body_bytes)
    asyncio.run(limited(scope_with(headers), recorder.receive, recorder.send))


def test_the_middleware_reads_a_chunked_body_only_up_to_the_limit() -> None:
    recorder = Recorder()
    run(recorder, [], LIMIT)
    assert recorder.status == 413 and recorder.app_body is None
    assert recorder.chunks_sent == LIMIT // CHUNK + 1  # of the 64 the client had


def test_the_middleware_refuses_a_declared_length_without_reading() -> None:
    recorder = Recorder()
    run(recorder, [(b"content-length", str(64 * CHUNK).encode())], LIMIT)
    assert (recorder.status, recorder.chunks_sent, recorder.app_body) == (413, 0, None)


def test_the_middleware_hands_a_body_within_the_limit_on_whole() -> None:
    recorder = Recorder()
    run(recorder, [], 64 * CHUNK)
    assert recorder.status == 200 and recorder.app_body == b"x" * CHUNK * 64


def test_the_key_is_checked_first_also_behind_a_proxy_prefix() -> None:
    from creditworker.http.auth import ApiKeyCheck, ApiKeyGuard

    recorder = Recorder()
    guard = ApiKeyGuard(
        BodyLimit(recorder.app, max_body_bytes=LIMIT),
        check=ApiKeyCheck([API_KEY], broker_url="redis://127.0.0.1:1/0"), path_prefix="/credits",
    )
    scope = {**scope_with([(b"content-length", b"10")]), "root_path": "/api",
             "path": "/api/credits/add"}
    asyncio.run(guard(scope, recorder.receive, recorder.send))
    assert (recorder.status, recorder.chunks_sent, recorder.app_body) == (401, 0, None)

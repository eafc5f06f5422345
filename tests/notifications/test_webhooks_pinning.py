"""The sender connects only to addresses it checked as it connects (DNS rebinding), with a
real receiver on loopback: a name that resolves to loopback is refused at connection time,
even when the URL check before the batch was skipped, and nothing reaches the receiver."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from creditworker.notifications.webhooks import sending


@pytest.fixture
def receiver() -> Iterator[tuple[int, list[str]]]:
    received: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(self.path)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], received
    server.shutdown()


def test_a_connection_to_a_private_address_is_refused_as_it_is_made(receiver: tuple[int, list[str]]) -> None:
    port, received = receiver
    with sending.client(2.0) as http:
        answer = sending.post(http, f"http://localhost:{port}/hook", b"{}", {}, deadline_seconds=2)
    assert answer.status is None
    assert answer.error is not None and "loopback, link-local or private" in answer.error
    assert received == []


def test_allowed_private_addresses_are_reached(receiver: tuple[int, list[str]]) -> None:
    port, received = receiver
    with sending.client(2.0, allow_private=True) as http:
        answer = sending.post(http, f"http://localhost:{port}/hook", b"{}", {}, deadline_seconds=2)
    assert answer.status == 204
    assert received == ["/hook"]

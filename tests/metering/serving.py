"""A real HTTP server for metering tests: uvicorn on a free port in a thread, and a fake
OpenAI-compatible chat endpoint that streams like the real one."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

CARD = {
    "gpt-4o-mini": {"prompt_tokens": 150_000, "completion_tokens": 600_000, "cached_tokens": 75_000},
    "big-model": {"prompt_tokens": 2_500_000, "completion_tokens": 10_000_000},
}
"""Credits per million tokens: 0.15 / 0.6 / 0.075 credits per token for gpt-4o-mini."""


@contextmanager
def served(app: Any, *, root_path: str = "") -> Iterator[str]:
    """`app` behind uvicorn on 127.0.0.1 (a free port); yields its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                            root_path=root_path)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


class Gate:
    """Lets a test hold a stream between two chunks until it has read the first one."""

    def __init__(self) -> None:
        self.event = threading.Event()

    async def wait(self) -> None:
        await asyncio.to_thread(self.event.wait, 10)


def chat_app(gate: Gate | None = None, **middleware: Any) -> FastAPI:
    """`POST /v1/chat/completions` as OpenAI answers it, streamed when `stream` is true.

    Test knobs in the body: `usage` (the usage object to report; default from the words),
    `answer_model` (the model the response names), `chunks`, `hang` (keep streaming slowly
    after the usage event, for a client that goes away), `state_usage` (set as
    `request.state.credit_usage`), `format` (`sse` or `ndjson`), `status`, `sleep` (seconds
    before answering).
    """
    from creditworker.http.metering.middleware import CreditDeductionMiddleware

    app = FastAPI()
    if middleware:
        app.add_middleware(CreditDeductionMiddleware, **middleware)
    app.state.generated = 0

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        model = body.get("answer_model", body.get("model", "gpt-4o-mini"))
        usage = body.get("usage", {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21,
                                   "prompt_tokens_details": {"cached_tokens": 0}})
        if "state_usage" in body:
            request.state.credit_usage = body["state_usage"]
        if body.get("sleep"):
            await asyncio.sleep(body["sleep"])
        if body.get("status"):
            return JSONResponse({"error": {"message": "upstream failed"}}, status_code=body["status"])
        if not body.get("stream"):
            answer: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion", "model": model,
                                      "choices": [{"index": 0, "message": {"role": "assistant",
                                                                           "content": "Hello there"}}]}
            if usage is not None:
                answer["usage"] = usage
            return answer
        ndjson = body.get("format") == "ndjson"

        def event(payload: Any) -> bytes:
            text = json.dumps(payload)
            return f"{text}\n".encode() if ndjson else f"data: {text}\n\n".encode()

        async def chunks() -> AsyncIterator[bytes]:
            for index in range(body.get("chunks", 3)):
                app.state.generated += 1
                yield event({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model,
                             "choices": [{"index": 0, "delta": {"content": f"word{index} "}}],
                             "usage": None})
                if index == 0 and gate is not None:
                    await gate.wait()
            if usage is not None and body.get("stream_options", {}).get("include_usage"):
                yield event({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model,
                             "choices": [], "usage": usage})
            for _ in range(body.get("hang", 0)):
                await asyncio.sleep(0.05)
                yield event({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model,
                             "choices": [{"index": 0, "delta": {"content": "more "}}]})
            if not ndjson:
                yield b"data: [DONE]\n\n"

        media_type = "application/x-ndjson" if ndjson else "text/event-stream"
        return StreamingResponse(chunks(), media_type=media_type)

    return app


def chat(model: str = "gpt-4o-mini", stream: bool = True, **knobs: Any) -> dict[str, Any]:
    """A chat completion request body (OpenAI's shape, with the test knobs)."""
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "stream": stream,
            "stream_options": {"include_usage": True}, **knobs}

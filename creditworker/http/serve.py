"""Run the gateway with uvicorn: the target of `creditworker serve --host --port`."""

from __future__ import annotations

import uvicorn

from creditworker.http.api.app import create_app


def serve(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve `create_app()` (configured from CREDITWORKER_* variables) until interrupted."""
    uvicorn.run(create_app(), host=host, port=port)

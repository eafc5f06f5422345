"""A metered FastAPI app: each answer under /v1 is charged the tokens it reports using.

Run it beside a worker (the embedded defaults need no servers; run both from the same
directory so they share the SQLite file and the broker folders):

    creditworker up                                  # terminal 1: worker and beat
    creditworker add alice 1000                      # give alice credits
    uvicorn examples.metered_app:app --port 8001     # terminal 2
    curl -i -X POST localhost:8001/v1/answer -H 'X-User-ID: alice' \
         -H 'X-Estimated-Tokens: 50' -H 'X-Request-ID: q-1' \
         -H 'Content-Type: application/json' -d '{"question": "What is a lot?"}'

The response carries `X-Credits-Deducted: 24` (its `usage.total_tokens`); repeating it
with the same X-Request-ID charges nothing new. Without X-User-ID the answer is 401, and
with fewer credits than the estimate it is 402. /health is not metered.
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

from creditworker.http.metering.middleware import CreditDeductionMiddleware
from producers.aio import AsyncCreditClient


class Question(BaseModel):
    question: str


app = FastAPI(title="metered example")
app.add_middleware(
    CreditDeductionMiddleware,
    client=AsyncCreditClient(),
    path_prefix="/v1/",
    response_usage_key="usage.total_tokens",
)


@app.post("/v1/answer")
async def answer(question: Question) -> dict[str, object]:
    """Pretends to call a model: the answer's usage is what the middleware charges."""
    words = question.question.split()
    return {
        "answer": f"You asked {len(words)} words; here is a short answer.",
        "usage": {"total_tokens": 20 + len(words)},
    }


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}

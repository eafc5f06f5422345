"""Payment providers: what charges an auto top-up (issue 29).

A provider is one method, `charge`, idempotent per `idempotency_key`: the worker sends the
same key for every attempt at one top-up (a retried or redelivered task, a sweep after a
crash), and a provider that already charged that key answers its first answer again
without charging twice (Stripe's `Idempotency-Key` header does exactly this; the example
adapter is in docs/topups.md). `CREDITWORKER_PAYMENT_PROVIDER` picks one: `manual` (the
built-in `ManualProvider`) or `module:object`.

`ScriptedProvider` is the test double the fault tests drive from another process: it keeps
its charges in a folder, answers scripted outcomes, and can block mid-charge while a flag
file exists (tests/e2e/test_topups_e2e.py kills the worker there).
"""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import time
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from creditworker.contract.errors import PaymentProviderError


class ChargeStatus(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PENDING = "pending"


@dataclass(frozen=True)
class Charge:
    """A provider's answer: the status, its reference for the charge (a PaymentIntent id),
    and why it failed."""

    status: ChargeStatus
    reference: str | None = None
    error: str | None = None


@runtime_checkable
class PaymentProvider(Protocol):
    def charge(self, *, account: str, credits: int, amount: Decimal | None, currency: str,
               idempotency_key: str) -> Charge | str | dict[str, Any]:
        """Charge `account` for `credits` (costing `amount` of `currency`, None when the rule
        has no price); the same `idempotency_key` must never be charged twice."""
        ...


class ManualProvider:
    """Grants at once, charging nobody: for internal credits, or a team that bills by hand."""

    def charge(self, *, account: str, credits: int, amount: Decimal | None, currency: str,
               idempotency_key: str) -> Charge:
        return Charge(ChargeStatus.SUCCEEDED, reference=f"manual:{idempotency_key}")


MANUAL = "manual"


def load_provider(spec: str | None) -> PaymentProvider:
    """The provider `spec` names (`manual`, or `module:object`; a class is instantiated
    without arguments); `PaymentProviderError` saying what is wrong otherwise."""
    if spec is None or spec.strip() in ("", MANUAL):
        return ManualProvider()
    module_name, colon, attribute = spec.strip().partition(":")
    if not colon or not module_name or not attribute:
        raise PaymentProviderError(
            f"CREDITWORKER_PAYMENT_PROVIDER={spec!r} is neither 'manual' nor 'module:object'",
            provider=spec)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 (any import failure is the setting's fault)
        raise PaymentProviderError(
            f"CREDITWORKER_PAYMENT_PROVIDER={spec!r}: module {module_name!r} does not import: "
            f"{type(exc).__name__}: {exc}", provider=spec) from None
    found: Any = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise PaymentProviderError(
                f"CREDITWORKER_PAYMENT_PROVIDER={spec!r}: module {module_name!r} has no {attribute!r}",
                provider=spec)
        found = getattr(found, part)
    if isinstance(found, type):
        found = found()
    if not callable(getattr(found, "charge", None)):
        raise PaymentProviderError(
            f"CREDITWORKER_PAYMENT_PROVIDER={spec!r}: {attribute!r} has no charge() method", provider=spec)
    return found  # type: ignore[no-any-return]


def charge_outcome(answer: Any) -> Charge:
    """A provider's answer as a `Charge`: a `Charge`, a status string, or a mapping with
    `status` (and `reference`, `error`); anything else is the provider's error."""
    if isinstance(answer, Charge):
        status, reference, error = answer.status, answer.reference, answer.error
    elif isinstance(answer, str):
        status, reference, error = answer, None, None
    elif isinstance(answer, dict):
        status, reference, error = answer.get("status"), answer.get("reference"), answer.get("error")
    else:
        raise PaymentProviderError(
            f"the payment provider answered {type(answer).__name__}, not succeeded, failed or pending")
    try:
        status = ChargeStatus(status)
    except ValueError:
        raise PaymentProviderError(
            f"the payment provider answered status {status!r}, not succeeded, failed or pending") from None
    if reference is not None and not isinstance(reference, str):
        reference = str(reference)
    return Charge(status, reference=reference[:200] if reference else None,
                  error=None if error is None else str(error)[:500])


# ---------------------------------------------------------------- the test double


class ScriptedProvider:
    """A provider whose answers a test writes into a folder (`CREDITWORKER_TEST_PAYMENT_DIR`
    unless given): `outcomes` holds one answer per line, used in order for each new key
    (`succeeded`, `failed`, `pending`, `raise`, `garbage`; none left: `succeeded`);
    `charges.jsonl` gets one line per key charged; while `block` exists, a charge waits after
    recording itself (the money is taken, the answer not yet back)."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self._folder = Path(folder) if folder is not None else None

    @property
    def folder(self) -> Path:
        folder = self._folder or Path(os.environ.get("CREDITWORKER_TEST_PAYMENT_DIR", ".creditworker-payments"))
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def charges(self) -> list[dict[str, Any]]:
        path = self.folder / "charges.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def script(self, *outcomes: str) -> None:
        (self.folder / "outcomes").write_text("".join(f"{outcome}\n" for outcome in outcomes))

    def charge(self, *, account: str, credits: int, amount: Decimal | None, currency: str,
               idempotency_key: str) -> Any:
        folder = self.folder
        with open(folder / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            known = {charge["idempotency_key"]: charge for charge in self.charges()}
            if idempotency_key in known:
                answer = known[idempotency_key]["answer"]
            else:
                answer = self._next_outcome(folder)
                if answer in (ChargeStatus.SUCCEEDED, ChargeStatus.PENDING):  # money taken (or promised)
                    with open(folder / "charges.jsonl", "a") as charges:
                        charges.write(json.dumps({
                            "idempotency_key": idempotency_key, "account": account, "credits": credits,
                            "amount": None if amount is None else str(amount), "currency": currency,
                            "answer": answer}) + "\n")
        while (folder / "block").exists():
            time.sleep(0.05)
        if answer == "raise":
            raise ConnectionError("the scripted provider is down")
        if answer == "garbage":
            return 42
        return {"status": answer, "reference": f"scripted:{idempotency_key}",
                "error": "card declined" if answer == ChargeStatus.FAILED else None}

    @staticmethod
    def _next_outcome(folder: Path) -> str:
        path = folder / "outcomes"
        lines = path.read_text().splitlines() if path.exists() else []
        if not lines:
            return ChargeStatus.SUCCEEDED.value
        path.write_text("".join(f"{line}\n" for line in lines[1:]))
        return lines[0].strip()


scripted = ScriptedProvider()
"""`creditworker.engine.payments:scripted`, as the tests name it."""

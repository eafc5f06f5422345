"""Signing secrets at rest: sealed with the key setting when one is given.

With `CREDITWORKER_WEBHOOKS_SECRET_KEY` set, a secret is stored as `fernet:<token>`
(`cryptography`'s Fernet: AES-128-CBC with HMAC-SHA256, keyed by a SHA-256 of the setting),
so a database dump alone does not reveal it; without the key it is stored as
`plain:whsec_...`. Secrets stored before a key was set stay readable; a sealed secret read
without the key (or with another one) is a clear error, never a guess.
"""

from __future__ import annotations

import base64
import hashlib

from creditworker.contract.errors import WebhookSecretUnreadable

SEALED = "fernet:"
PLAIN = "plain:"


class SecretBox:
    """Seals and opens signing secrets with one key (or none)."""

    def __init__(self, key: str | None) -> None:
        self._fernet = None
        if key:
            from cryptography.fernet import Fernet

            self._fernet = Fernet(base64.urlsafe_b64encode(hashlib.sha256(key.encode()).digest()))

    @property
    def seals(self) -> bool:
        return self._fernet is not None

    def seal(self, secret: str) -> str:
        if self._fernet is None:
            return PLAIN + secret
        return SEALED + self._fernet.encrypt(secret.encode()).decode()

    def open(self, stored: str) -> str:
        if stored.startswith(PLAIN):
            return stored.removeprefix(PLAIN)
        if not stored.startswith(SEALED):
            raise WebhookSecretUnreadable("a stored webhook secret has an unknown form")
        if self._fernet is None:
            raise WebhookSecretUnreadable(
                "the webhook secret is sealed: set CREDITWORKER_WEBHOOKS_SECRET_KEY to the key it was sealed with")
        from cryptography.fernet import InvalidToken

        try:
            return self._fernet.decrypt(stored.removeprefix(SEALED).encode()).decode()
        except InvalidToken:
            raise WebhookSecretUnreadable(
                "the webhook secret was sealed with another CREDITWORKER_WEBHOOKS_SECRET_KEY") from None

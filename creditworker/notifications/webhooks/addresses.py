"""Where deliveries may go: http(s) URLs of bounded length whose host resolves to public
addresses only, unless private ones are allowed (`CREDITWORKER_WEBHOOKS_ALLOW_PRIVATE=1`,
for development and tests).

A webhook URL is chosen by whoever registers it, and the worker posts to it from inside the
network: without this check it could reach the database, a cloud metadata service
(169.254.169.254) or an admin port on loopback. Checked at registration, again before each
batch of sends (a name can be re-pointed after it was registered), and at every connection:
`public_addresses` is what the sender connects to (sending.py), so a name that resolves to a
public address for the check and to a private one a moment later (DNS rebinding) is refused.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from creditworker.contract.errors import InvalidWebhookUrl
from creditworker.contract.webhooks import MAX_URL_LENGTH


def checked_url(url: str, *, allow_private: bool) -> str:
    """`url` stripped, or `InvalidWebhookUrl` saying why it may not be used."""
    url = url.strip()
    if any(ord(character) < 0x21 or ord(character) == 0x7F for character in url):
        raise InvalidWebhookUrl("a webhook URL may not contain spaces or control characters")
    try:
        url.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidWebhookUrl("a webhook URL must be valid Unicode text") from None
    if len(url) > MAX_URL_LENGTH:
        raise InvalidWebhookUrl(f"a webhook URL is at most {MAX_URL_LENGTH} characters", length=len(url))
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidWebhookUrl(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidWebhookUrl(f"a webhook URL must be http or https, not {parts.scheme or 'none'!r}",
                                scheme=parts.scheme)
    if not parts.hostname:
        raise InvalidWebhookUrl("a webhook URL needs a host")
    if parts.username or parts.password:
        raise InvalidWebhookUrl("a webhook URL may not carry a user or password")
    if not allow_private:
        check_host(parts.hostname, port or (443 if parts.scheme == "https" else 80))
    return url


def check_host(host: str, port: int) -> None:
    """Raise `InvalidWebhookUrl` if `host` does not resolve, or resolves to any address
    that is not public."""
    public_addresses(host, port)


def public_addresses(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, all public, or `InvalidWebhookUrl`."""
    try:
        found = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError, ValueError) as exc:
        raise InvalidWebhookUrl(f"the host {host!r} does not resolve: {exc}", host=host) from None
    addresses = []
    for *_rest, sockaddr in found:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if not address.is_global or address.is_multicast:
            raise InvalidWebhookUrl(
                f"the host {host!r} resolves to {address}, a loopback, link-local or private address;"
                " set CREDITWORKER_WEBHOOKS_ALLOW_PRIVATE=1 to allow it (development and tests only)",
                host=host, address=str(address))
        addresses.append(str(address))
    return addresses

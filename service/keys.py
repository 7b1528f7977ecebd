"""API keys: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``, compared in constant time.

Two sets of keys guard routes: the inference keys (``api_key``, ``api_key_file``) the inference
and model routes require (and ``/metrics`` with ``metrics_require_key``), and the management keys
(``management_api_key``) of the repository API. A setting holds one key or several separated by
commas (one per client, so one can be revoked); a file holds one per line. Keys are never logged
and never echoed back.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable
from pathlib import Path

from service.errors import ConfigError, Unauthorized
from service.http.request import Head
from service.settings import setting_ref

log = logging.getLogger(__name__)


def accepted_keys(setting: str | None) -> list[bytes]:
    if not setting:
        return []
    return [key.strip().encode() for key in setting.split(",") if key.strip()]


def read_key_file(path: Path) -> list[bytes]:
    """The keys in a file, one per line; blank lines and lines starting with '#' are skipped."""
    named = setting_ref("api_key_file", str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{named} cannot be read: {why}") from None
    keys = [line.strip() for line in text.splitlines()]
    found = [key.encode() for key in keys if key and not key.startswith("#")]
    if not found:
        # An empty file must not turn authentication off without a word.
        raise ConfigError(f"{named} holds no key: write one key per line")
    return found


def head_key(head: Head) -> bytes | None:
    """The key a request carries, from its parsed head (the first of each header)."""
    if head.authorization is not None:
        scheme, _, token = head.authorization.partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip()
    return head.api_key or None


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The key a request carries, from its headers (names in lower case)."""
    api_key = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and api_key is None and value:
            api_key = value
    return api_key


def key_matches(presented: bytes | None, keys: list[bytes]) -> bool:
    """Constant time in the key's content: every accepted key is compared, always."""
    matched = False
    for key in keys:
        # NOTE: compare_digest's time depends on lengths only; | (not or) so none is skipped.
        matched |= hmac.compare_digest(presented or b"", key)
    return matched and presented is not None


class Keys:
    """The keys one guard accepts: a setting's, and a file's, which ``reload`` reads again."""

    def __init__(self, name: str, setting: str | None, file: Path | None = None) -> None:
        self.name = name  # how a 401 names what is missing, e.g. "api_key"
        self._own = accepted_keys(setting)
        self._file = file
        self._keys = self._own + (read_key_file(file) if file is not None else [])

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def check(self, head: Head) -> None:
        """Raise 401 unless the request carries one of the keys (nothing to do without keys)."""
        self.check_key(head_key(head))

    def check_headers(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """As ``check``, for an ASGI request's headers (the FastAPI routes)."""
        self.check_key(presented_key(headers))

    def check_key(self, presented: bytes | None) -> None:
        if self._keys and not key_matches(presented, self._keys):
            raise Unauthorized(
                f"a valid key is required ({self.name}): send Authorization: Bearer <key> or "
                "X-API-Key: <key>"
            )

    def reload(self) -> None:
        """Read the key file again (keys rotated in place, e.g. a mounted Secret); if it cannot
        be read or holds no key, the keys in force stay."""
        if self._file is None:
            return
        try:
            keys = self._own + read_key_file(self._file)
        except ConfigError as exc:
            log.error("%s; the keys read before stay in force", exc.message)
            return
        if keys != self._keys:
            log.info("%s: %d keys in force", self.name, len(keys))  # how many, never which
        self._keys = keys

"""API keys: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``, compared in constant time.

A setting holds one key or several separated by commas (one per client, so one can be revoked).
Keys are never logged and never echoed back.
"""

from __future__ import annotations

import hmac

from starlette.requests import HTTPConnection

from service.errors import Unauthorized


def accepted_keys(setting: str | None) -> list[bytes]:
    if not setting:
        return []
    return [key.strip().encode() for key in setting.split(",") if key.strip()]


def presented_key(connection: HTTPConnection) -> bytes | None:
    authorization = connection.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip().encode()
    key = connection.headers.get("x-api-key")
    return key.encode() if key else None


def key_matches(presented: bytes | None, keys: list[bytes]) -> bool:
    """Constant time in the key's content: every accepted key is compared, always."""
    matched = False
    for key in keys:
        # NOTE: compare_digest's time depends on lengths only; | (not or) so none is skipped.
        matched |= hmac.compare_digest(presented or b"", key)
    return matched and presented is not None


def require_key(connection: HTTPConnection, setting: str | None, name: str) -> None:
    keys = accepted_keys(setting)
    if keys and not key_matches(presented_key(connection), keys):
        raise Unauthorized(
            f"a valid key is required ({name}): send Authorization: Bearer <key> or X-API-Key"
        )

"""Read a JWT's claims without verifying it.

Carbon Mapper's tokens are JWTs signed with a key only the platform has, so the package can
only *read* their claims (to learn the exact expiry); it never trusts them for anything else.
The emulator's signing lives with it, in `cm_tasks.testing._jwt`.
"""

from __future__ import annotations

import base64
import json
from typing import Any


def _b64url_decode(segment: str) -> bytes:
    padding = "=" * (-len(segment) % 4)
    return base64.urlsafe_b64decode(segment + padding)


def decode_claims(token: str) -> dict[str, Any] | None:
    """Return the claims of a JWT without verifying its signature, or None if it is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(_b64url_decode(parts[1]))
    except (ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None

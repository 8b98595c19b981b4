"""Minimal JWT helpers: read claims without verifying, and sign HS256 (for the emulator).

Carbon Mapper's tokens are JWTs signed with a key only the platform has, so the package can
only *read* their claims (to learn the exact expiry); it never trusts them for anything else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any


def _b64url_decode(segment: str) -> bytes:
    padding = "=" * (-len(segment) % 4)
    return base64.urlsafe_b64decode(segment + padding)


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


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


def encode_hs256(claims: dict[str, Any], key: bytes) -> str:
    """Sign claims as a compact HS256 JWT."""
    header = _b64url_encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64url_encode(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode("ascii")
    signature = hmac.new(key, signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url_encode(signature)}"


def verify_hs256(token: str, key: bytes) -> dict[str, Any] | None:
    """Return the claims of an HS256 JWT signed with key, or None if the signature is wrong."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
    expected = _b64url_encode(hmac.new(key, signing_input, hashlib.sha256).digest())
    if not hmac.compare_digest(expected, parts[2]):
        return None
    return decode_claims(token)

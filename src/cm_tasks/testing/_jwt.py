"""HS256 JWTs for the emulator: sign the tokens it issues, and verify those it is sent.

The package itself only ever *reads* a token's claims (`cm_tasks._jwt.decode_claims`): the
platform signs its tokens with a key only it has.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from cm_tasks._jwt import decode_claims


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


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

"""Keeping secrets out of what s2l_ray prints: one `redact(text)` for log lines, error messages,
tracebacks and `s2l config` output. Dependency-free, so config checks can use it too."""

from __future__ import annotations

import os
import re

REDACTED = "[REDACTED]"
# Environment variables whose values are secrets, by name.
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIAL", re.IGNORECASE)
# Query parameters that carry credentials (s3://b/p?secret_key=..., signed URLs' X-Amz-Signature).
SECRET_PARAM = re.compile(r"key|secret|token|passw|credential|signature|auth|session",
                          re.IGNORECASE)
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")
# scheme://USERINFO@host: everything up to the last @ of the URI, a secret holding '/' included.
_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^\s'\"]*@")
_QUERY_SECRET = re.compile(
    r"([?&;][^=&;\s'\"#]*(?:key|secret|token|passw|credential|signature|auth|session)"
    r"[^=&;\s'\"#]*=)[^&;\s'\"#]*", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with [REDACTED] in place of: the values of secret-looking environment variables
    (names containing TOKEN, SECRET, PASSWORD, KEY, CREDENTIAL; values of 8+ characters,
    shorter ones would hit ordinary words), Hugging Face tokens (hf_...), the user-info part
    of URIs (scheme://KEY:SECRET@...) and credential-like query parameters' values."""
    # Read at each call: a token exported after logging was set up is still hidden.
    values = {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 8}
    for v in sorted(values, key=len, reverse=True):  # longest first: no half-hidden overlaps
        text = text.replace(v, REDACTED)
    text = _HF_TOKEN.sub(REDACTED, text)
    text = _USERINFO.sub(rf"\1{REDACTED}@", text)
    return _QUERY_SECRET.sub(rf"\1{REDACTED}", text)

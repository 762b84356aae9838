"""Failure reasons: every rejected or failed row of an ingest is counted under one short name.

Names: missing_url, invalid_url, caption_too_short, caption_too_long, duplicate_url (rejected before downloading);
http_<code>, connection_refused, redirect_loop, timeout, deadline_exceeded, dns_error, connection_error,
robots_optout, not_an_image, truncated, corrupt, decompression_bomb, too_large, too_small, aspect_ratio (while
downloading and resizing); other for anything unrecognised (its message is kept in failures.parquet). The content
reasons (not_an_image, truncated, corrupt, decompression_bomb, too_large) come from `pipeline.images`, the one
validator of untrusted image bytes, and name the same faults in the error rows of embedding tables.
"""

from __future__ import annotations

import re


class Fault(Exception):
    """An image or download rejected for a known reason; its message is tagged `[kind]` so it survives img2dataset's
    logs, and `detail` keeps the message without the tag (embedding error rows read `<kind>: <detail>`)."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"[{kind}] {message}")
        self.kind = kind
        self.detail = message


_TAGGED = re.compile(r"^\[(\w+)\]")
_PATTERNS = [  # (regex on img2dataset's / urllib's message, reason); first match wins
    (r"redirect error that would lead to an infinite loop|Too many redirects", "redirect_loop"),
    (r"HTTP Error (\d{3})", "http_{0}"),
    (r"Connection refused", "connection_refused"),
    (r"timed out|TimeoutError", "timeout"),
    (r"Name or service not known|getaddrinfo|nodename nor servname", "dns_error"),
    (r"IncompleteRead|Remote end closed|Connection reset|Connection aborted|BadStatusLine", "connection_error"),
    (r"unknown url type|no host given", "invalid_url"),
    (r"X-Robots-Tag", "robots_optout"),
    (r"image too small", "too_small"),
    (r"aspect ratio too large", "aspect_ratio"),
    (r"image area too large", "too_large"),
    (r"Image decoding error|decod", "corrupt"),
    (r"hash mismatch", "hash_mismatch"),
]


def classify_error(message: str | None) -> str:
    """Map an img2dataset/urllib error message, or one tagged `[kind]` here, to a short reason name."""
    if not message:
        return "unknown"
    tagged = _TAGGED.match(message)
    if tagged:
        return tagged.group(1)
    for pattern, reason in _PATTERNS:
        found = re.search(pattern, message)
        if found:
            return reason.format(*found.groups())
    return "other"

"""Offsets, cursors and ETags of the Durable Streams protocol (PROTOCOL.md §8, §10).

An offset is `%016d_%016d`: a read-sequence (always 0 here; reserved for compaction) and the byte
position after the message. Fixed width makes the strings sort the way the positions do.
"""

from __future__ import annotations

import base64
import random
import re
import time

_OFFSET_RE = re.compile(r"^(\d+)_(\d+)$")
# Beyond every real position: an offset from a later read-sequence than any we mint.
BEYOND = 2**62
MAX_POSITION = 10**16 - 1
ZERO_OFFSET = "0000000000000000_0000000000000000"

CURSOR_EPOCH_S = 1_728_432_000  # 2024-10-09T00:00:00Z, the protocol's cursor epoch
CURSOR_INTERVAL_S = 20


class InvalidOffset(ValueError):
    pass


def format_offset(position: int) -> str:
    return f"{0:016d}_{position:016d}"


def parse_offset(raw: str) -> int:
    """The byte position an offset names; InvalidOffset for anything but `\\d+_\\d+`."""
    match = _OFFSET_RE.fullmatch(raw)
    if match is None:
        raise InvalidOffset(raw)
    read_seq, position = int(match.group(1)), int(match.group(2))
    if read_seq > 0:
        return BEYOND
    return min(position, BEYOND)


def current_cursor(now: float | None = None) -> int:
    now = time.time() if now is None else now
    return int((now - CURSOR_EPOCH_S) // CURSOR_INTERVAL_S)


def response_cursor(client_cursor: str | None, now: float | None = None) -> str:
    """The cursor for a live response: the current interval, or strictly past the client's cursor
    (with 1-3600 s of jitter) so CDN-collapsed long-polls never loop on one cached answer."""
    current = current_cursor(now)
    if not client_cursor:
        return str(current)
    try:
        client = int(client_cursor)
    except ValueError:
        return str(current)
    if client < current:
        return str(current)
    jitter_s = random.randint(1, 3600)
    return str(client + max(1, -(-jitter_s // CURSOR_INTERVAL_S)))


def make_etag(path: str, start: str, end: str, closed: bool) -> str:
    encoded = base64.b64encode(path.encode()).decode()
    return f'"{encoded}:{start}:{end}{":c" if closed else ""}"'

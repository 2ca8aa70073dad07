"""Turns a stream's raw bytes into complete lines, deterministically.

A record value may end anywhere: in the middle of a line, or in the middle of a multi-byte UTF-8 character.
The chunker keeps whatever is incomplete as `pending` bytes (part of the stream's snapshot) and only hands out
complete lines. What it emits depends on the stream's bytes alone, never on how records were grouped by a
poll: feeding `b"ab"` then `b"c\\n"` emits exactly what feeding `b"abc\\n"` emits.

An unterminated line longer than `max_pending_bytes` is cut at the last UTF-8 character boundary before the
limit and emitted as a line of its own, so a stream without newlines (one endless document) still flows.
"""

from __future__ import annotations


def _utf8_boundary(buf: bytes, limit: int) -> int:
    """Largest cut <= limit that does not split a UTF-8 character (at least 1 byte of progress)."""
    cut = min(limit, len(buf))
    while cut > 0 and cut < len(buf) and (buf[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut if cut > 0 else min(limit, len(buf))


class LineChunker:
    """Per-stream line splitter with carried-over pending bytes."""

    def __init__(self, max_pending_bytes: int = 65536):
        if max_pending_bytes < 4:
            raise ValueError(f"max_pending_bytes must be at least 4 (one UTF-8 character), got {max_pending_bytes}")
        self.max_pending_bytes = max_pending_bytes
        # Bytes of an incomplete line (or character); part of the stream's snapshot, restored by assignment.
        self.pending = b""

    def feed(self, data: bytes) -> list[str]:
        """Append `data`; return the lines it completes, each with its trailing newline (if it had one)."""
        buf = self.pending + data
        lines: list[bytes] = []
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            lines.append(buf[start : end + 1])
            start = end + 1
        rest = buf[start:]
        while len(rest) >= self.max_pending_bytes:
            cut = _utf8_boundary(rest, self.max_pending_bytes)
            lines.append(rest[:cut])
            rest = rest[cut:]
        self.pending = rest
        return [line.decode("utf-8", errors="replace") for line in lines]

    def reset(self) -> None:
        self.pending = b""

"""Turns a stream's raw bytes into complete lines, deterministically.

A record value may end anywhere: in the middle of a line, or in the middle of a multi-byte UTF-8 character.
The chunker keeps whatever is incomplete as `pending` bytes (part of the stream's snapshot) and only hands out
complete lines. What it emits depends on the stream's bytes alone, never on how records were grouped by a
poll: feeding `b"ab"` then `b"c\\n"` emits exactly what feeding `b"abc\\n"` emits.

A line longer than `max_pending_bytes` (terminated or not) is emitted in pieces of at most that many bytes,
each cut at the last UTF-8 character boundary at or before the limit, so a stream without newlines (one
endless document) still flows and pending bytes never exceed the limit. A cut is made only once the byte after
the limit has arrived (it tells whether the limit falls inside a character), and whether the line's newline
came in the same record or a later one does not matter: the pieces are the same however the bytes were split.
"""

from __future__ import annotations


def _utf8_boundary(buf: bytes, limit: int) -> int:
    """Largest cut <= limit that does not split a UTF-8 character; `buf` has more than `limit` bytes, so
    `buf[limit]` shows whether the limit falls inside a character. At least 1 byte of progress (invalid UTF-8
    of only continuation bytes is cut at the limit)."""
    cut = limit
    while cut > 0 and (buf[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut if cut > 0 else limit


class LineChunker:
    """Per-stream line splitter with carried-over pending bytes."""

    def __init__(self, max_pending_bytes: int = 65536):
        if max_pending_bytes < 4:
            raise ValueError(f"max_pending_bytes must be at least 4 (one UTF-8 character), got {max_pending_bytes}")
        self.max_pending_bytes = max_pending_bytes
        # Bytes of an incomplete line (or character), at most max_pending_bytes; part of the stream's snapshot.
        self.pending = b""

    def _pieces(self, line: bytes, out: list[bytes]) -> bytes:
        """Append the full-length pieces of `line` to `out`; return what is left (<= max_pending_bytes)."""
        limit = self.max_pending_bytes
        while len(line) > limit:
            cut = _utf8_boundary(line, limit)
            out.append(line[:cut])
            line = line[cut:]
        return line

    def feed(self, data: bytes) -> list[str]:
        """Append `data`; return the lines it completes, each with its trailing newline (if it had one)."""
        buf = self.pending + data
        lines: list[bytes] = []
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            lines.append(self._pieces(buf[start : end + 1], lines))
            start = end + 1
        self.pending = self._pieces(buf[start:], lines)
        return [line.decode("utf-8", errors="replace") for line in lines]

    def reset(self) -> None:
        self.pending = b""

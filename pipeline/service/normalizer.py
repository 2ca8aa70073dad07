"""Optional masking of variable fields in log lines before they are scored.

Timestamps, IP addresses, hex ids, UUIDs, paths with numbers and plain numbers are different on every line,
so a language model finds them surprising whether or not the line is unusual. Replacing them with short
placeholders makes the score track the *shape* of a line. Whether that helps anomaly ranking is measured by
`sinkstream anomaly` (see docs/anomaly.md), not assumed.
"""

from __future__ import annotations

import re

# Order matters: the most specific patterns first.
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"), "<UUID>"),
    (re.compile(r"\b\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2})?\b"), "<TS>"),
    (re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b"), "<IP>"),
    (re.compile(r"\b\d{1,2}:\d{2}:\d{2}(?:[.,]\d+)?\b"), "<TIME>"),
    (re.compile(r"\b\d{4}[-/.]\d{2}[-/.]\d{2}\b|\b\d{2}[-/]\d{2}[-/]\d{2,4}\b"), "<DATE>"),
    (re.compile(r"\b0x[0-9a-fA-F]+\b|\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{6,}\b"), "<HEX>"),
    (re.compile(r"(?<![A-Za-z0-9<>])[-+]?\d+(?:\.\d+)?(?![A-Za-z0-9<>])"), "<NUM>"),
]


def normalize_line(line: str) -> str:
    """Replace variable fields in one line with placeholders; the trailing newline is kept."""
    for pattern, placeholder in _PATTERNS:
        line = pattern.sub(placeholder, line)
    return line

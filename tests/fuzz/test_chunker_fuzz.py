"""Properties of `LineChunker`: what it emits must not depend on how the stream's bytes were cut into records.

The contract (module docstring of `pipeline.service.chunker`): feeding `b"ab"` then `b"c\\n"` emits exactly what
feeding `b"abc\\n"` emits; lines are `str`; pending bytes never exceed `max_pending_bytes`. The last two tests
are the two ways split invariance used to break at the limit (found by these properties, fixed since).
"""

from __future__ import annotations

import itertools

from hypothesis import assume, example, given
from hypothesis import strategies as st

from pipeline.service.chunker import LineChunker


def _feed_all(parts: list[bytes], limit: int) -> tuple[list[str], bytes]:
    chunker = LineChunker(limit)
    lines: list[str] = []
    for part in parts:
        lines += chunker.feed(part)
        assert len(chunker.pending) <= limit  # never more than the limit
    return lines, chunker.pending


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# Lines of any bytes (invalid UTF-8, NUL, control, CR, multi-byte characters), each shorter than `limit`.
_byte = st.sampled_from([b"a", b"Z", b"0", b" ", b"\r", b"\x00", b"\x1b", b"\xff", b"\xc3", b"\xa9",
                         b"\xe2\x82\xac", b"\xf0\x9f\x98\x80"])


@st.composite
def _stream(draw, limit: int, terminated_tail: bool = False) -> bytes:
    n = draw(st.integers(0, 12))
    out = b""
    for _ in range(n):
        line = b"".join(draw(st.lists(_byte, max_size=limit)))[: limit - 1]
        out += line + b"\n"
    tail = b"".join(draw(st.lists(_byte, max_size=limit)))[: limit - 1]
    return out + (b"" if terminated_tail else tail)


@given(data=st.data(), limit=st.integers(4, 64))
def test_lines_shorter_than_the_limit_come_out_the_same_however_the_bytes_are_split(data, limit):
    stream = data.draw(_stream(limit))
    cuts = data.draw(st.lists(st.integers(0, 10_000), max_size=20))
    whole = _feed_all([stream], limit)
    split = _feed_all(_split(stream, cuts), limit)
    assert split == whole
    lines, pending = whole
    assert all(isinstance(line, str) for line in lines)
    assert "".join(lines).count("\n") == stream.count(b"\n")
    assert stream.endswith(pending)


@given(data=st.data(), limit=st.integers(4, 64))
def test_valid_utf8_round_trips_through_any_split(data, limit):
    chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\n")
    text = data.draw(st.text(chars, max_size=limit // 4))
    lines_in = data.draw(st.lists(st.text(chars), max_size=8))
    stream = "".join(line.encode()[: limit - 1].decode(errors="ignore") + "\n" for line in lines_in) + text
    raw = stream.encode()
    assume(len(text.encode()) < limit)
    cuts = data.draw(st.lists(st.integers(0, 10_000), max_size=20))
    lines, pending = _feed_all(_split(raw, cuts), limit)
    assert "".join(lines) + pending.decode() == stream


@given(data=st.binary(max_size=4000), limit=st.integers(4, 300), cuts=st.lists(st.integers(0, 10_000), max_size=30))
def test_any_bytes_any_split_never_raises_and_pending_stays_below_the_limit(data, limit, cuts):
    lines, pending = _feed_all(_split(data, cuts), limit)
    assert all(isinstance(line, str) for line in lines)
    for line in lines:
        line.encode("utf-8")  # valid str: no lone surrogates
    assert len(pending) <= limit and data.endswith(pending)
    assert sum(line.count("\n") for line in lines) == data.count(b"\n")


@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=400), limit=st.integers(4, 40))
def test_a_long_unterminated_line_is_cut_on_character_boundaries_in_one_feed(text, limit):
    raw = text.replace("\n", "").encode()
    lines, pending = _feed_all([raw], limit)
    assert "".join(lines) + pending.decode() == text.replace("\n", "")  # no U+FFFD: cuts between characters
    assert all(len(line.encode()) <= limit for line in lines)


# ---- at the limit (two bugs these properties found: a record ending at the limit inside a character was cut
# there, turning valid UTF-8 into U+FFFD; a line longer than the limit was emitted whole when its newline came
# in the same record but cut when it spanned records) -------------------------------------------------------


@given(parts=st.just([b"abc\xc3", b"\xa9\n"]))
@example(parts=[b"x" * 63 + b"\xe2", b"\x82\xac\n"])
def test_a_record_ending_at_the_limit_inside_a_character_keeps_the_character(parts):
    limit = len(parts[0])  # the first record leaves exactly the limit pending
    lines, pending = _feed_all(parts, limit)
    assert "\ufffd" not in "".join(lines)
    assert "".join(lines) + pending.decode() == b"".join(parts).decode()


@given(split_at=st.integers(1, 9))
@example(split_at=5)
def test_a_line_longer_than_the_limit_comes_out_the_same_however_it_is_split(split_at):
    stream = b"0123456789\n"
    assert _feed_all([stream], 8) == _feed_all([stream[:split_at], stream[split_at:]], 8)


@given(pieces=st.lists(st.one_of(_byte, st.just(b"\n")), max_size=300), limit=st.integers(4, 24),
       cuts=st.lists(st.integers(0, 10_000), max_size=30))
def test_any_bytes_and_lines_of_any_length_come_out_the_same_however_they_are_split(pieces, limit, cuts):
    """The whole contract: lines longer than the limit, invalid UTF-8, characters across record boundaries."""
    stream = b"".join(pieces)
    whole = _feed_all([stream], limit)
    assert _feed_all(_split(stream, cuts), limit) == whole

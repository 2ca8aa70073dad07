"""Properties of `normalize_line` that hold for every str: total, idempotent, line structure kept, and no
standalone number left unmasked (the `<NUM>` rule's own definition of a number)."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from pipeline.service.normalizer import _PATTERNS, normalize_line

# Text biased towards what the patterns look for: digits, separators, hex letters, placeholders' brackets.
_log_text = st.text(st.sampled_from(list("0123456789abcdefABCDEFxX:.-/+ T,Z<>\nq_é")), max_size=80)
_any_text = st.text(max_size=200)  # includes lone surrogates and every unicode category
_NUM = _PATTERNS[-1][0]


@given(st.one_of(_log_text, _any_text))
def test_normalize_never_raises_and_keeps_the_line_structure(line):
    out = normalize_line(line)
    assert isinstance(out, str)
    assert out.count("\n") == line.count("\n")
    assert out.endswith("\n") == line.endswith("\n")


@given(st.one_of(_log_text, _any_text))
def test_normalize_is_idempotent(line):
    once = normalize_line(line)
    assert normalize_line(once) == once


@given(st.one_of(_log_text, _any_text))
def test_no_standalone_number_survives(line):
    out = normalize_line(line)
    assert _NUM.search(out) is None, out


@given(st.text(st.characters(blacklist_categories=("Nd",), blacklist_characters="abcdefABCDEF"), max_size=200))
def test_text_without_digits_or_hex_letters_is_unchanged(line):
    assert normalize_line(line) == line


@given(st.lists(st.integers(0, 10**12), min_size=1, max_size=6), st.sampled_from([" ", " | ", ", ", "\t"]))
def test_plain_numbers_between_separators_are_masked(numbers, sep):
    line = "took" + sep + sep.join(str(n) for n in numbers) + sep + "ms"
    out = normalize_line(line)
    assert not re.search(r"\d", out), out

"""`sinkstream bench llamacpp` without llama.cpp built (the suite never builds it): the reason is reported with
the build command, a crashed llama.cpp process is an error row instead of the benchmark's end, and the table
shows what ran."""

from __future__ import annotations

import pytest

from pipeline.bench import llamacpp


def test_without_the_build_the_error_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKSTREAM_HOME", str(tmp_path))
    with pytest.raises(LookupError, match=r"is not built in .*pip install --no-cache-dir --no-deps --target"):
        llamacpp.import_llama_cpp()
    got = llamacpp.llamacpp_in_child(tokens=[1, 2, 3], threads=1, decode_steps=1, repeats=1, streams=[1], chunk=4,
                                     extra_bufts=False)
    assert got["error"].startswith("LookupError: llama-cpp-python 0.3.36 is not built in ")


def test_table_rows_for_both_engines():
    row = {"pp0_tokens_per_s": 100.4, "pp1024_tokens_per_s": 90.6, "decode1024_ms": 20.04,
           "decode1024_tokens_per_s": 49.9}
    result = {
        "llamacpp": {"version": "0.3.36", "extra_buffer_types": False,
                     "rows": [{**row, "streams": 1, "flash_attn": "off"}]},
        "sinkstream": [{**row, "streams": 64, "dtype": "bfloat16"}],
    }
    assert llamacpp.table(result)[2:] == [
        "| llama.cpp 0.3.36, flash attention off, extra buffer types off | Q4_1 | 1 | 100 | 91 | 20.0 | 50 |",
        "| sinkstream pooled | bfloat16 | 64 | 100 | 91 | 20.0 | 50 |",
    ]
    assert len(llamacpp.table({**result, "llamacpp": {"error": "the llama.cpp process died (SIGILL)"}})) == 3

"""The long-term template memory (issue 18): Drain clusters, counts, LRU bound, reference seeding, and a saved
memory that behaves exactly as one that never stopped."""

from __future__ import annotations

import json
import random

import pytest
from pydantic import ValidationError

from pipeline.service.templates import (
    StreamTemplates,
    TemplateMemory,
    build_reference,
    mask,
)
from pipeline.settings import TemplateSettings

LINES = [
    "2024-01-01 10:00:01 INFO block blk_1234 replicated to 10.0.0.1:50010",
    "2024-01-01 10:00:02 INFO block blk_5678 replicated to 10.0.0.2:50010",
    "2024-01-01 10:00:03 WARN disk /dev/sda1 is 91% full",
    "2024-01-01 10:00:04 INFO block blk_9999 replicated to 10.0.0.7:50010",
    "2024-01-01 10:00:05 ERROR connection refused by peer 10.0.0.9",
    "2024-01-01 10:00:06 WARN disk /dev/sdb1 is 95% full",
]


def _lines(n: int, seed: int = 7) -> list[str]:
    """A log of n lines over ~60 message shapes with variable fields (deterministic)."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "lambda", "zeta"]
    out = []
    for i in range(n):
        shape = rng.randrange(60)
        a, b = words[shape % 10], words[(shape // 10) % 10]
        out.append(f"2024-01-{i % 28 + 1:02d} 10:{i % 60:02d}:00 node{rng.randrange(9)} {a} {b} task "
                   f"{rng.randrange(10**6)} state {shape} took {rng.random():.3f}s")
    return out


def test_mask_turns_variable_fields_into_drain_parameters():
    assert mask(LINES[0]) == "<*> INFO block blk_<*> replicated to <*>"
    assert mask("took 12 ms\n") == "took <*> ms"


def test_templates_ids_and_counts_before_each_line():
    memory = TemplateMemory(TemplateSettings())
    got = [memory.observe(line) for line in LINES]
    assert [m.id for m in got] == [1, 1, 2, 1, 3, 2]
    assert [m.seen_partition for m in got] == [0, 1, 0, 2, 0, 1]
    assert [m.partition_lines for m in got] == [0, 1, 2, 3, 4, 5]
    assert all(m.seen_reference == 0 for m in got)
    assert got[3].text == "<*> INFO block blk_<*> replicated to <*>"
    assert memory.lines == 6 and len(memory) == 3


def test_ids_do_not_depend_on_python_hash_randomization():
    import subprocess
    import sys

    code = ("from pipeline.service.templates import TemplateMemory; from pipeline.settings import TemplateSettings;"
            "from tests.service.test_templates import _lines; m = TemplateMemory(TemplateSettings());"
            "print([m.observe(x).id for x in _lines(300)][-50:], m.to_json()['tree'] == m.to_json()['tree'])")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, **_env()}).stdout for seed in ("1", "2", "3")}
    assert len(outs) == 1, outs


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}


def test_partition_memory_is_bounded_least_recently_seen_first():
    memory = TemplateMemory(TemplateSettings(partition_max_clusters=5))
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]
    shapes = [f"{w} happened in unit {w}" for w in words]  # 8 templates
    for line in shapes:
        memory.observe(line)
    assert len(memory) == 5 and list(memory.lru) == [4, 5, 6, 7, 8]
    assert memory.observe(shapes[0]).seen_partition == 0  # evicted: new again, under a new id
    assert len(memory) == 5 and list(memory.lru) == [5, 6, 7, 8, 9]
    assert memory.observe(shapes[7]).seen_partition == 1  # still remembered


def test_stream_templates_count_and_are_bounded():
    stream = StreamTemplates(limit=3)
    assert [stream.observe(t) for t in (1, 2, 1, 3, 4, 1, 2)] == [0, 0, 1, 0, 0, 2, 0]
    assert list(stream.counts.items()) == [(4, 1), (1, 3), (2, 1)]
    again = StreamTemplates.from_json(3, json.loads(json.dumps(stream.to_json())))
    assert again.counts == stream.counts and list(again.counts) == list(stream.counts)


@pytest.mark.parametrize("limit", [3, 2000])
def test_saved_memory_behaves_exactly_as_one_that_never_stopped(limit):
    settings = TemplateSettings(partition_max_clusters=limit)
    lines = _lines(1200)
    straight = TemplateMemory(settings)
    expected = [straight.observe(x) for x in lines]
    for cut in (0, 1, 57, 600, 1199):
        first = TemplateMemory(settings)
        got = [first.observe(x) for x in lines[:cut]]
        saved = json.loads(json.dumps(first.to_json()))  # through JSON text, as in the manifest
        resumed = TemplateMemory.from_state(settings, saved)
        got += [resumed.observe(x) for x in lines[cut:]]
        assert got == expected, cut
        assert resumed.to_json() == straight.to_json()
    if limit == 3:
        assert len(straight) == 3 and straight.drain.clusters_counter > 6  # eviction did happen


def test_reference_seeds_pinned_templates():
    settings = TemplateSettings(partition_max_clusters=2)
    reference = build_reference(LINES[:3] + [""], settings)
    assert reference.ref == {1: 2, 2: 1} and reference.ref_lines == 3 and reference.reference is not None
    memory = reference.copy()
    seen = memory.observe("2024-02-02 11:00:00 INFO block blk_42 replicated to 10.1.1.1:50010")
    assert (seen.id, seen.seen_partition, seen.seen_reference) == (1, 0, 2)
    for i in range(5):  # more new templates than the bound: the reference's stay
        memory.observe(f"{'abcde'[i]} unrelated message number {'fghij'[i]}")
    assert memory.observe("2024-03-03 12:00:00 WARN disk /dev/sdc1 is 99% full").seen_reference == 1
    assert set(memory.ref) <= set(memory.drain.id_to_cluster) and len(memory.lru) == 2
    assert reference.lines == 0 and len(reference) == 2  # the reference itself is untouched


SESSIONS = [  # three reference sessions (blocks), interleaved; blk_1 and blk_3 have the same mix of templates
    "INFO allocate blk_1", "INFO allocate blk_2", "INFO receive blk_1 from 10.0.0.1 ok",
    "INFO receive blk_1 from 10.0.0.2 ok", "INFO allocate blk_3", "INFO receive blk_3 from 10.0.0.3 ok",
    "INFO delete blk_2 now", "INFO receive blk_3 from 10.0.0.4 ok", "WARN no session in this line",
]


def test_reference_sessions_become_distinct_profiles_and_a_distance():
    settings = TemplateSettings(reference_session=r"(blk_\d+)")
    reference = build_reference(SESSIONS, settings)
    probes = ("INFO allocate blk_9", "INFO receive blk_9 from 10.1.1.1 ok", "INFO delete blk_9 now")
    alloc, recv, delete = (reference.observe(x).id for x in probes)
    # blk_1 and blk_3: allocate once, receive twice (one profile); blk_2: allocate, delete
    assert reference.profiles == [((alloc, 1), (recv, 2)), ((alloc, 1), (delete, 1))]
    assert reference.profile_distance({alloc: 1, recv: 2}) == 0.0
    assert reference.profile_distance({alloc: 1}) == pytest.approx(1 / 2)  # vs (alloc 1, delete 1): 1 / 2
    assert reference.profile_distance({alloc: 1, recv: 3}) == pytest.approx(1 / 4)
    # a template no session has counts in both sums: (alloc 1, recv 2) + 2 unknown -> 2 / 5
    assert reference.profile_distance({alloc: 1, recv: 2, 999: 2}) == pytest.approx(2 / 5)
    assert reference.profile_distance({}) == 1.0
    # the profiles are part of the saved memory (exactly), and of the reference's fingerprint
    restored = TemplateMemory.from_state(settings, json.loads(json.dumps(reference.to_json())))
    assert restored.profiles == reference.profiles
    assert restored.profile_distance({alloc: 1, recv: 3}) == reference.profile_distance({alloc: 1, recv: 3})
    plain = build_reference(SESSIONS, TemplateSettings())
    assert plain.profiles == [] and plain.profile_distance({alloc: 1}) is None
    assert plain.reference != build_reference(SESSIONS, settings).reference
    # bounded: the first distinct profiles met
    assert build_reference(SESSIONS, TemplateSettings(reference_session=r"blk_\d+",
                                                      reference_max_profiles=1)).profiles == reference.profiles[:1]


def test_a_bad_session_pattern_is_a_one_line_settings_error():
    with pytest.raises(ValidationError, match="expected a regular expression"):
        TemplateSettings(reference_session="blk_(")


@pytest.mark.parametrize("bad", [
    {"format": 2, "counter": 0, "clusters": [], "tree": {}},
    {"format": 1, "counter": 1, "clusters": [{"id": 5, "tokens": ["a"], "size": 1}], "tree": {}},
    {"format": 1, "counter": 3, "clusters": [{"id": 1, "tokens": ["a"], "size": 1}] * 2, "tree": {}},
    {"format": 1, "counter": 1, "clusters": [], "tree": {"k": {"x": "not a node"}}},
    {"py/object": "os.system", "format": 1, "counter": 0, "clusters": [], "tree": {}},
    {"format": 1, "counter": 1, "clusters": [{"id": 1, "tokens": ["a"], "size": 1, "ref": 1}], "tree": {},
     "profiles": [[[2, 1]]]},  # a profile of a template that is not the reference's
    {"format": 1, "counter": 1, "clusters": [{"id": 1, "tokens": ["a"], "size": 1, "ref": 1}], "tree": {},
     "profiles": [[[1, 0]]]},
])
def test_a_bad_saved_memory_is_refused(bad):
    with pytest.raises((ValidationError, ValueError)):
        TemplateMemory.from_state(TemplateSettings(), bad)

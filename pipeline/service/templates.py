"""Long-term memory of log templates, in two scopes: the partition's and the stream's (issue 18).

The LM's surprise is short-term memory: it only sees the sliding window. This module remembers *which kinds of
lines* (templates) a partition and a stream have seen, for as long as the memory's bound allows, so that a line
can be "new to this stream", "new to this partition" or "not in the reference of normal" long after the window
has moved on.

**Template miner: Drain, from `drain3-improved`, in memory only.** Choices compared:

- `drain3` 0.9.11 (logpai, last release 2022): pins `jsonpickle==1.5.1` and `cachetools==4.2.1` exactly, so it
  cannot share a venv with current packages, and its `TemplateMiner` persists state only through jsonpickle
  (an insecure deserializer: loading a blob can run code).
- `drain3-improved` 0.10.0 (2026, a maintained fork of the same code, same `drain3` import name): current
  dependency ranges and Python versions. Its `TemplateMiner` still persists with jsonpickle.
- Our own Drain: rewriting a well-kept library's job.

So: `drain3-improved`, but only its in-memory `drain3.drain.Drain` class (the algorithm: a fixed-depth prefix
tree, similarity threshold, `<*>` parameters). Its `TemplateMiner`, masking and persistence handlers are never
used, and nothing of ours ever calls jsonpickle (the package is installed as a dependency of the fork, unused).
The state (clusters and prefix tree) is written and read by `TemplateMemoryState`, a pydantic model of plain
JSON: validated on load, never pickle.

**Bounded.** The Drain instance runs without its own LRU (`max_clusters=None`); `TemplateMemory` evicts the
least recently matched cluster itself once more than `templates.partition_max_clusters` clusters (not counting
the reference's, which are pinned) are alive, exactly as Drain's LRU would (a stale id stays in its tree leaf
until Drain cleans it). Keeping the recency order ourselves makes it serializable without touching private
fields of `cachetools`. The stream scope is a count per template id (`StreamTemplates`), LRU-bounded by
`templates.stream_max_clusters`.

**Deterministic.** Template ids are Drain's cluster counter (1, 2, ...: the order in which templates were first
seen, reference first), never Python's `hash`; the tree and the recency order are saved in their exact order,
so a restored memory matches, evicts and numbers exactly as one that never stopped.

**Masking.** Before mining, variable fields (timestamps, IPs, hex ids, numbers: `normalize_line`'s patterns)
become Drain's parameter `<*>`, so they never count as similar tokens; Drain also routes any other token with a
digit to the wildcard branch of its tree.

**Reference of normal.** `build_reference(lines, settings)` mines a text of normal lines into a memory whose
clusters carry their reference counts and are pinned; every partition memory starts as a copy of it, so "new"
can also mean "not in the reference".

**Normal sessions.** With `templates.reference_session` (a regular expression naming the session of a line,
e.g. an HDFS block id) the reference is also a set of sessions: each session's template counts are a
*profile*, the distinct ones are kept (at most `templates.reference_max_profiles`, in the memory's state), and
`TemplateMemory.profile_distance(counts)` says how far a stream's template counts are from the nearest normal
session: 1 - weighted Jaccard, sum|a - b| / sum max(a, b) over template ids, a template outside the reference
counting in both sums (0 = exactly a normal session's mix, 1 = nothing in common). This is the event-count
vector detector of the log-anomaly literature (ECVC in ait-aecid/anomaly-detection-log-datasets), online:
the verdict carries it after every line, and at the session's last line it is the distance of the whole session.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from drain3.drain import Drain, LogCluster, Node
from pydantic import BaseModel, ConfigDict, Field

from pipeline.service.normalizer import normalize_line
from pipeline.service.threshold import AlertThreshold, ThresholdState
from pipeline.settings import TemplateSettings

PARAM = "<*>"
MAX_TEMPLATE_TEXT = 240  # longest template text carried in an annotation
_PLACEHOLDER = re.compile(r"<(?:UUID|TS|IP|TIME|DATE|HEX|NUM)>")


def mask(line: str) -> str:
    """The line as Drain sees it: variable fields replaced by the parameter `<*>`."""
    return _PLACEHOLDER.sub(PARAM, normalize_line(line.rstrip("\n")))


# ---- persisted state (validated JSON) ---------------------------------------------------------------------
class _State(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeState(_State):
    """A node of Drain's prefix tree: children by token (in insertion order) and cluster ids at a leaf."""

    k: dict[str, NodeState] = Field(default_factory=dict)
    c: list[int] = Field(default_factory=list)


class ClusterState(_State):
    id: int = Field(ge=1)
    tokens: list[str]
    size: int = Field(ge=1, description="Drain's cluster size (lines matched, reference included)")
    seen: int = Field(0, ge=0, description="Lines of this partition matched (the reference not included)")
    ref: int = Field(0, ge=0, description="Lines of the reference matched (0: not a reference template)")


class TemplateMemoryState(_State):
    """A partition's (or a reference's) template memory, as saved beside the partition's manifest."""

    format: Literal[1] = 1
    counter: int = Field(ge=0, description="Drain's cluster counter: the id of the last template created")
    lines: int = Field(0, ge=0, description="Lines of the partition observed (the reference's not counted)")
    ref_lines: int = Field(0, ge=0, description="Lines of the reference")
    reference: str | None = Field(None, description="sha256 of the reference memory this one was seeded from")
    # Reference clusters (pinned) in id order, then the others from least to most recently matched.
    clusters: list[ClusterState]
    tree: NodeState
    threshold: ThresholdState | None = Field(
        None, description="The partition's alert threshold over all its streams' scores (pipeline.service.verdict); "
                          "absent in memories saved before it and in a reference")
    profiles: list[list[tuple[int, int]]] = Field(
        default_factory=list, description="Distinct (template id, count) profiles of the reference's sessions "
                                          "(`templates.reference_session`), in the order first met")


class StreamTemplatesState(_State):
    """A stream's counts per template id, least recently seen first (in the stream's snapshot)."""

    format: Literal[1] = 1
    counts: list[tuple[int, int]]


# ---- the partition scope ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TemplateMatch:
    """What the memory knows about one line."""

    id: int
    text: str
    seen_partition: int  # lines of this partition with this template before this one
    seen_reference: int  # lines of the reference with this template (0: not in the reference)
    partition_lines: int  # lines of this partition before this one


def _new_drain(settings: TemplateSettings) -> Drain:
    return Drain(depth=settings.depth, sim_th=settings.sim_th, max_children=settings.max_children,
                 max_clusters=None, param_str=PARAM, parametrize_numeric_tokens=True)


class TemplateMemory:
    """Drain over one partition's lines (or a reference), with per-template counts and an LRU bound."""

    def __init__(self, settings: TemplateSettings):
        self.settings = settings
        self.drain = _new_drain(settings)
        self.seen: dict[int, int] = {}
        self.ref: dict[int, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # non-reference clusters, least recently matched first
        self.reference: str | None = None
        self.lines = 0  # lines of the partition observed (the reference's not counted)
        self.ref_lines = 0  # lines of the reference
        # The (1 - alert_rate) quantile of the partition's line scores, fed by `StreamJudge.judge`: the threshold
        # of streams too young for their own (short keys); saved with the memory.
        self.threshold = AlertThreshold()
        # The reference's normal sessions as template-count profiles (module docstring), fixed after `seed`.
        self.profiles: list[tuple[tuple[int, int], ...]] = []
        self._matrix: tuple[np.ndarray, dict[int, int]] | None = None  # profiles as rows, built on first use

    def __len__(self) -> int:
        return len(self.drain.id_to_cluster)

    def observe(self, line: str) -> TemplateMatch:
        """Mine `line` into the memory; its template and how often that template was seen before."""
        cluster, _ = self.drain.add_log_message(mask(line))
        cid = cluster.cluster_id
        lines_before = self.lines
        self.lines += 1
        before = self.seen.get(cid, 0)
        self.seen[cid] = before + 1
        ref = self.ref.get(cid, 0)
        if not ref:
            self.lru[cid] = None
            self.lru.move_to_end(cid)
            while len(self.lru) > self.settings.partition_max_clusters:
                old, _ = self.lru.popitem(last=False)
                del self.drain.id_to_cluster[old]
                self.seen.pop(old, None)
        return TemplateMatch(cid, cluster.get_template()[:MAX_TEMPLATE_TEXT], before, ref, lines_before)

    def seed(self, lines: Iterable[str]) -> None:
        """Mine reference lines: their templates are pinned and counted as the reference's; with
        `reference_session`, each session's template counts become a profile (module docstring)."""
        pattern = self.settings.reference_session
        session = re.compile(pattern) if pattern else None
        sessions: dict[str, Counter[int]] = {}
        for line in lines:
            cluster, _ = self.drain.add_log_message(mask(line))
            self.ref[cluster.cluster_id] = self.ref.get(cluster.cluster_id, 0) + 1
            self.ref_lines += 1
            found = session.search(line) if session is not None else None
            if found is not None:
                key = found.group(1) if found.re.groups else found.group(0)
                sessions.setdefault(key, Counter())[cluster.cluster_id] += 1
        distinct = dict.fromkeys(tuple(sorted(counts.items())) for counts in sessions.values())
        self.profiles = list(distinct)[: self.settings.reference_max_profiles]
        self._matrix = None
        self.reference = hashlib.sha256(self.state().model_dump_json(exclude={"threshold"}).encode()).hexdigest()

    def profile_distance(self, counts: Mapping[int, int]) -> float | None:
        """Distance of a stream's template `counts` to the nearest reference session (module docstring);
        None without profiles."""
        if not self.profiles:
            return None
        if self._matrix is None:
            ids = sorted({tid for profile in self.profiles for tid, _ in profile})
            index = {tid: i for i, tid in enumerate(ids)}
            matrix = np.zeros((len(self.profiles), len(ids)))  # (profiles, template ids)
            for r, profile in enumerate(self.profiles):
                for tid, n in profile:
                    matrix[r, index[tid]] = n
            self._matrix = matrix, index
        matrix, index = self._matrix
        row = np.zeros(matrix.shape[1])
        outside = 0  # lines of templates no normal session has: in both sums
        for tid, n in counts.items():
            i = index.get(tid)
            if i is None:
                outside += n
            else:
                row[i] = n
        diff = np.abs(matrix - row).sum(axis=1) + outside
        limit = np.maximum(matrix, row).sum(axis=1) + outside
        return float((diff / np.maximum(limit, 1e-12)).min())

    # ---- state ------------------------------------------------------------------------------------------
    def state(self) -> TemplateMemoryState:
        """A deep copy of the memory as a validated model (safe to hand to another thread)."""
        clusters = []
        order = [cid for cid in sorted(self.ref)] + list(self.lru)
        for cid in order:
            c = self.drain.id_to_cluster[cid]
            assert c is not None
            clusters.append(ClusterState(id=cid, tokens=list(c.log_template_tokens), size=c.size,
                                         seen=self.seen.get(cid, 0), ref=self.ref.get(cid, 0)))
        tree = _dump_node(self.drain.root_node, set(self.drain.id_to_cluster))
        return TemplateMemoryState(counter=self.drain.clusters_counter, reference=self.reference,
                                   lines=self.lines, ref_lines=self.ref_lines, clusters=clusters, tree=tree,
                                   threshold=self.threshold.state() if self.threshold.n else None,
                                   profiles=[list(p) for p in self.profiles])

    def to_json(self) -> dict[str, Any]:
        return self.state().model_dump(mode="json")

    @classmethod
    def from_state(cls, settings: TemplateSettings, state: TemplateMemoryState | dict[str, Any]) -> TemplateMemory:
        """Rebuild a memory from `state()`; raises pydantic's ValidationError or ValueError for a bad one."""
        st = state if isinstance(state, TemplateMemoryState) else TemplateMemoryState.model_validate(state)
        memory = cls(settings)
        ids = [c.id for c in st.clusters]
        if len(set(ids)) != len(ids) or any(i > st.counter for i in ids):
            raise ValueError(f"template memory: expected distinct cluster ids <= counter {st.counter}")
        for c in st.clusters:
            memory.drain.id_to_cluster[c.id] = _cluster(c)
            if c.seen:
                memory.seen[c.id] = c.seen
            if c.ref:
                memory.ref[c.id] = c.ref
            else:
                memory.lru[c.id] = None
        memory.drain.clusters_counter = st.counter
        memory.drain.root_node = _load_node(st.tree)
        memory.reference = st.reference
        memory.lines, memory.ref_lines = st.lines, st.ref_lines
        for profile in st.profiles:
            if not profile or any(tid not in memory.ref or n < 1 for tid, n in profile):
                raise ValueError("template memory: expected session profiles of reference template ids with "
                                 f"counts >= 1, got {profile[:5]}")
        memory.profiles = [tuple((tid, n) for tid, n in p) for p in st.profiles]
        if st.threshold is not None:
            memory.threshold = AlertThreshold.from_json(st.threshold)
        return memory

    def copy(self) -> TemplateMemory:
        return TemplateMemory.from_state(self.settings, self.state())


def _cluster(c: ClusterState) -> LogCluster:
    cluster = LogCluster(c.tokens, c.id)
    cluster.size = c.size
    return cluster


def _dump_node(node: Node, alive: set[int]) -> NodeState:
    # Stale ids (evicted clusters) are dropped: Drain skips them when matching and drops them at the leaf's
    # next insertion, so leaving them out changes nothing it does.
    return NodeState(k={key: _dump_node(child, alive) for key, child in node.key_to_child_node.items()},
                     c=[cid for cid in node.cluster_ids if cid in alive])


def _load_node(state: NodeState) -> Node:
    node = Node()
    node.key_to_child_node = {key: _load_node(child) for key, child in state.k.items()}
    node.cluster_ids = list(state.c)
    return node


# ---- the stream scope ---------------------------------------------------------------------------------------
class StreamTemplates:
    """How often a stream saw each template id of its partition's memory (LRU-bounded)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.counts: OrderedDict[int, int] = OrderedDict()

    def observe(self, template_id: int) -> int:
        """Count one more line of `template_id`; returns the count before it."""
        before = self.counts.get(template_id, 0)
        self.counts[template_id] = before + 1
        self.counts.move_to_end(template_id)
        while len(self.counts) > self.limit:
            self.counts.popitem(last=False)
        return before

    def to_json(self) -> dict[str, Any]:
        return StreamTemplatesState(counts=list(self.counts.items())).model_dump(mode="json")

    @classmethod
    def from_json(cls, limit: int, data: dict[str, Any]) -> StreamTemplates:
        st = StreamTemplatesState.model_validate(data)
        out = cls(limit)
        for tid, n in st.counts:
            if tid < 1 or n < 1:
                raise ValueError(f"stream templates: expected ids and counts >= 1, got ({tid}, {n})")
            out.counts[tid] = n
        return out


# ---- the reference ------------------------------------------------------------------------------------------
def build_reference(lines: Iterable[str], settings: TemplateSettings) -> TemplateMemory:
    """A memory seeded with `lines` of normal text (pinned reference templates); the service's partitions
    start from a copy of it. Blank lines are skipped."""
    memory = TemplateMemory(settings)
    memory.seed(line for line in lines if line.strip())
    return memory


def load_reference(path: str | Path, settings: TemplateSettings) -> TemplateMemory:
    """`build_reference` over a text file of normal lines (UTF-8, undecodable bytes replaced)."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return build_reference(text.split("\n"), settings)

"""HDFS block sessions (the field's main session-level benchmark) as keyed log lines for the service.

Source: the public repository ait-aecid/anomaly-detection-log-datasets (GPL-3.0; Landauer, Skopik & Wurzenberger,
"A critical review of common log data sets used for evaluation of sequence-based anomaly detection techniques",
FSE 2024): `hdfs_logdeep/hdfs_train` (normal block sessions, one per line, as 1-based event ids),
`hdfs_logdeep/hdfs_test_abnormal` (anomalous sessions) and `templates/HDFS_templates.csv` (event id k = line k,
variable parts `<*>`). `fetch_hdfs` downloads the three files at run time from GitHub into
`$SINKSTREAM_HOME/data/ait-hdfs/` (a cache, never git; the licence and source are noted beside them), or reads
them from a local copy (`--data-dir`).

The sessions are event ids only; `render` turns each back into log lines as an HDFS DataNode/NameNode would
write them (`081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block blk_... terminating`):
each `<*>` is filled with a value that fits the words around it (block ids, `/10.250.x.y:50010` addresses,
sizes, paths), from a seeded generator. `interleave` mixes the sessions as concurrent blocks log: up to
`concurrent` sessions are open at once and each next line comes from a randomly chosen open session. Every line
carries its session's block id, the stream key.
"""

from __future__ import annotations

import random
import re
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from pipeline.evaluation.datasets import DatasetError, DatasetMissingError

log = structlog.get_logger(__name__)

REPO = "ait-aecid/anomaly-detection-log-datasets"
# Pinned: the numbers in docs/anomaly.md were measured on this commit's files.
COMMIT = "5296693"
FILES = {
    "train": "hdfs_logdeep/hdfs_train",
    "abnormal": "hdfs_logdeep/hdfs_test_abnormal",
    "templates": "templates/HDFS_templates.csv",
}
LICENCE_NOTE = (
    f"Files from https://github.com/{REPO} (commit {COMMIT}), licensed GPL-3.0 (see that repository's LICENSE).\n"
    "Landauer, Skopik, Wurzenberger: A critical review of common log data sets used for evaluation of\n"
    "sequence-based anomaly detection techniques, FSE 2024. Derived from the Loghub HDFS data set.\n"
)


def raw_url(path: str, commit: str = COMMIT) -> str:
    return f"https://raw.githubusercontent.com/{REPO}/{commit}/{path}"


def fetch_hdfs(home: Path, data_dir: Path | None = None, timeout_s: float = 60.0) -> dict[str, Path]:
    """Paths of the three files: from `data_dir` (a local copy laid out as in the repository), else from the
    cache `home/data/ait-hdfs/`, downloading what is missing from GitHub (raw URLs of the pinned commit)."""
    if data_dir is not None:
        paths = {name: Path(data_dir) / rel for name, rel in FILES.items()}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise DatasetMissingError(f"--data-dir: expected the ait-aecid files {sorted(FILES.values())} under "
                                      f"{data_dir}, missing {missing}")
        return paths
    cache = Path(home) / "data" / "ait-hdfs"
    paths = {name: cache / rel for name, rel in FILES.items()}
    for name, rel in FILES.items():
        if paths[name].is_file() and paths[name].stat().st_size > 0:
            continue
        url = raw_url(rel)
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        tmp = paths[name].with_suffix(".part")
        log.info("datasets.hdfs.download", url=url)
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(tmp, "wb") as out:  # noqa: S310
                out.write(resp.read())
        except OSError as exc:
            raise DatasetError(f"expected to download {url} (HDFS sessions for `eval anomaly`), got "
                               f"{type(exc).__name__}: {exc}; without internet pass --data-dir with a local "
                               "copy") from exc
        tmp.replace(paths[name])
    (cache / "SOURCE.txt").write_text(LICENCE_NOTE)
    return paths


def read_sessions(path: Path) -> list[list[int]]:
    """One session per line: space-separated 1-based event ids (empty lines skipped)."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append([int(x) for x in line.split()])
            except ValueError as exc:
                raise DatasetError(f"{path} line {n}: expected space-separated event ids, got {line[:60]!r}") from exc
    return out


def read_templates(path: Path) -> list[str]:
    """Template of event id k at index k - 1."""
    return [line.rstrip("\n") for line in Path(path).read_text().splitlines() if line.strip()]


# ---- rendering ---------------------------------------------------------------------------------------------

_COMPONENTS = (
    ("PacketResponder", "dfs.DataNode$PacketResponder"),
    ("NameSystem", "dfs.FSNamesystem"),
    ("BLOCK*", "dfs.FSNamesystem"),
    ("Verification succeeded", "dfs.DataBlockScanner"),
    ("PendingReplicationMonitor", "dfs.PendingReplicationMonitor"),
    ("Deleting block", "dfs.FSDataset"),
    ("Unexpected error trying to delete", "dfs.FSDataset"),
    ("Receiving", "dfs.DataNode$DataXceiver"),
    ("Received block", "dfs.DataNode$DataXceiver"),
    ("writeBlock", "dfs.DataNode$DataXceiver"),
    ("receiveBlock", "dfs.DataNode$DataXceiver"),
    ("Changing block file offset", "dfs.DataNode$BlockReceiver"),
    ("Exception writing block", "dfs.DataNode$BlockReceiver"),
    ("Receiving empty packet", "dfs.DataNode$BlockReceiver"),
    ("DataXceiver", "dfs.DataNode$DataXceiver"),
)


def _component(template: str) -> str:
    for needle, component in _COMPONENTS:
        if needle in template:
            return component
    return "dfs.DataNode"


@dataclass
class Session:
    """One block's session: its event ids, block id (the stream key) and label."""

    events: list[int]
    block: str
    abnormal: bool


class Renderer:
    """Fills the `<*>` slots of HDFS templates with plausible values (seeded; one block id per session)."""

    def __init__(self, templates: Sequence[str], seed: int = 0):
        self.templates = list(templates)
        self.rng = random.Random(seed)
        self.parts = [re.split(r"<\*>", t) for t in self.templates]
        self.nodes = [f"10.250.{self.rng.randint(0, 19)}.{self.rng.randint(2, 254)}" for _ in range(200)]
        self.t = 1226234000  # 2008-11-09, when the HDFS data set was recorded
        self.fill = fill_table(self.templates)

    def block_id(self) -> str:
        return f"blk_{'-' if self.rng.random() < 0.5 else ''}{self.rng.randint(10**17, 10**19 - 1)}"

    def _value(self, kind: str, block: str) -> str:
        node = self.rng.choice(self.nodes)
        if kind == "B":
            return block
        if kind == "A":
            return f"{node}:50010"
        if kind == "S":
            return f"/{node}:{self.rng.randint(30000, 60000)}"
        if kind == "N":
            return str(self.rng.choice([67108864, 67108864, 67108864, self.rng.randint(1000, 67108864)]))
        if kind == "R":
            return str(self.rng.randint(0, 2))
        if kind == "E":
            return self.rng.choice(EXCEPTIONS)
        if kind == "F":
            return f"/mnt/hadoop/dfs/data/current/subdir{self.rng.randint(0, 63)}/{block}"
        if kind == "T":
            task = f"task_200811092030_{self.rng.randint(1, 9):04d}_m_{self.rng.randint(0, 1999):06d}"
            part = f"part-{self.rng.randint(0, 1999):05d}"
            return f"/user/root/rand{self.rng.randint(1, 9)}/_temporary/_{task}_0/{part}. {block}"
        if kind == "O":
            return str(self.rng.choice([0, 512, 1024, 65536, 1048576]))
        if kind == "X":
            return ""
        return kind.replace("_", " ")  # a literal, e.g. "." or ":"

    def line(self, event: int, block: str) -> str:
        """One log line of event `event` (1-based) of the session of `block`."""
        if not 1 <= event <= len(self.templates):
            raise DatasetError(f"expected HDFS event ids 1..{len(self.templates)}, got {event}")
        parts = self.parts[event - 1]
        slots = len(parts) - 1
        kinds = self.fill.get(self.templates[event - 1])
        if kinds is None or len(kinds) != slots:  # another template file: every slot after the header gets the block
            kinds = ["X"] + ["B"] * (slots - 1)
        body = parts[0]
        for kind, after in zip(kinds, parts[1:]):
            body += f" {self._value(kind, block)} {after}"
        body = " ".join(body.split()).replace(" :", ":").replace(" .", ".").replace("NameSystem. ", "NameSystem.")
        self.t += self.rng.choice((0, 0, 0, 1))
        day = 8 + self.t // 86400 % 3
        clock = self.t % 86400
        pid = self.rng.randint(13, 35000)
        header = f"0811{day:02d} {clock // 3600:02d}{clock // 60 % 60:02d}{clock % 60:02d} {pid}"
        return f"{header} INFO {_component(self.templates[event - 1])}: {body}"


EXCEPTIONS = (
    "java.io.IOException: Connection reset by peer",
    "java.io.EOFException",
    "java.io.InterruptedIOException: Interruped while waiting for IO on channel",
    "java.net.SocketTimeoutException: 480000 millis timeout while waiting for channel to be ready for write",
)

# What fills each `<*>` of the templates of HDFS_templates.csv (the first one is the line's header): B block id,
# A DataNode address, S src/dest address with a port, N size, R PacketResponder number, E an exception, F a block
# file, T a task output path and the block, O an offset, X nothing, anything else literally ("_" = space).
_FILL_BY_ID = {
    1: "X B", 2: "X B", 3: "X B A", 4: "X B A", 5: "X B S S", 6: "X B S S N", 7: "X B E", 8: "X R B X",
    9: "X B N A", 10: "X R E", 11: "X R B X", 12: "A B A", 13: "X B", 14: "X B", 15: "X B O O O", 16: "A B A",
    17: "A B A E", 18: "X B A", 19: "X B", 20: "X B X", 21: "X B F", 22: "X . T", 23: "X . B A", 24: "X B X",
    25: "X A B A", 26: "X . A B N", 27: "X . B A N", 28: "X . B A N", 29: "X B", 30: "X A B",
    31: "A : :_java.io.IOException: B", 32: "X B", 33: "X F",
}
HDFS_TEMPLATES_FIRST = {
    1: "<*>Adding an already existing block<*>", 2: "<*>Verification succeeded for<*>",
    22: "<*>BLOCK* NameSystem<*>allocateBlock:<*>", 31: "<*>DataXceiver<*>DataXceiver<*>Block <*> is valid, and "
    "cannot be written to.",
}


def fill_table(templates: Sequence[str]) -> dict[str, list[str]]:
    """Slot kinds by template text, for the ait-aecid HDFS template file (recognised by a few of its lines)."""
    if len(templates) < 33 or any(templates[k - 1] != t for k, t in HDFS_TEMPLATES_FIRST.items()):
        return {}
    return {templates[k - 1]: kinds.split() for k, kinds in _FILL_BY_ID.items()}


def interleave(sessions: Sequence[Session], renderer: Renderer, concurrent: int = 30,
               seed: int = 0) -> list[tuple[str, str]]:
    """(block id, line) pairs: sessions open in order, at most `concurrent` at once; each next line comes from a
    randomly chosen open session (seeded), so a session's lines keep their order."""
    rng = random.Random(seed)
    queue = list(sessions)
    queue.reverse()
    open_: list[tuple[Session, int]] = []
    out: list[tuple[str, str]] = []
    while queue or open_:
        while queue and len(open_) < concurrent:
            open_.append((queue.pop(), 0))
        i = rng.randrange(len(open_))
        session, pos = open_[i]
        out.append((session.block, renderer.line(session.events[pos], session.block)))
        if pos + 1 == len(session.events):
            open_.pop(i)
        else:
            open_[i] = (session, pos + 1)
    return out


@dataclass
class HdfsSplit:
    """Reference (normal sessions declared normal) and test (other normal + abnormal sessions), rendered."""

    reference: list[Session]
    test: list[Session]


def split(train: Sequence[Sequence[int]], abnormal: Sequence[Sequence[int]], renderer: Renderer,
          reference: int = 1000, normal: int = 1000, anomalous: int = 200, seed: int = 0) -> HdfsSplit:
    """Reference = the first `reference` normal sessions; test = a fixed sample (seeded) of `normal` of the other
    normal sessions and of `anomalous` abnormal ones, in a shuffled order."""
    if reference + normal > len(train):
        raise DatasetError(f"expected at least {reference + normal} normal sessions, got {len(train)}")
    if anomalous > len(abnormal):
        raise DatasetError(f"expected at least {anomalous} abnormal sessions, got {len(abnormal)}")
    rng = random.Random(seed)
    ref = [Session(list(s), renderer.block_id(), False) for s in train[:reference]]
    normal_idx = sorted(rng.sample(range(reference, len(train)), normal))
    abnormal_idx = sorted(rng.sample(range(len(abnormal)), anomalous))
    test = [Session(list(train[i]), renderer.block_id(), False) for i in normal_idx]
    test += [Session(list(abnormal[i]), renderer.block_id(), True) for i in abnormal_idx]
    rng.shuffle(test)
    return HdfsSplit(ref, test)

"""Real sample data for demos, evaluation and tests, fetched through the package registries.

Two sources, neither of them committed to the repository (they land under `$SINKSTREAM_HOME/data/`,
which is git-ignored, or stay in `../shared/`):

- Canterbury corpus (English prose: `alice29.txt`, `asyoulik.txt`, `lcet10.txt`, `plrabn12.txt`), shipped
  as test data inside the brotli 1.2.1 source distribution on PyPI; see `canterbury()`.
- Loghub 2k samples (15 real system logs of 2,000 lines each), read in place from `../shared/data/loghub/`;
  see `loghub_dir()` and `bgl_labels()`.
  Loghub licence: free for research or academic work; any use or copy must name
  https://github.com/logpai/loghub and cite Jieming Zhu, Shilin He, Pinjia He, Jinyang Liu, Michael R. Lyu,
  "Loghub: A Large Collection of System Log Datasets for AI-driven Log Analytics", ISSRE 2023, and keep
  the licence notice with every copy.

Run `python -m pipeline.evaluation.datasets fetch [--home DIR]` to fetch everything into `$SINKSTREAM_HOME`.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import structlog

from pipeline.settings import sinkstream_home

log = structlog.get_logger(__name__)

BROTLI_VERSION = "1.2.1"
CANTERBURY_FILES: tuple[str, ...] = ("alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt")
LOGHUB_ENV = "SINKSTREAM_LOGHUB"
# Number of lines in BGL_2k.log whose label field is an alert category rather than `-`.
BGL_2K_ANOMALIES = 143


class DatasetError(RuntimeError):
    """A sample data set could not be fetched or read; the message says what was expected and what arrived."""


class DatasetMissingError(FileNotFoundError):
    """A local sample data set is not where it was looked for; the message says where and how to point to it."""


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `cmd`, capturing output; never raises on a non-zero exit (callers decide)."""
    log.debug("datasets.run", cmd=cmd, cwd=str(cwd) if cwd else None)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)  # noqa: S603 - argv built here


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def canterbury(home: Path) -> Path:
    """Return `home/data/canterbury/` holding the four Canterbury corpus texts, fetching them if needed.

    The texts come from the brotli 1.2.1 sdist (`pip download --no-binary :all:`); only
    `*/tests/testdata/<name>` members are read, and nothing else of the archive touches the disk but the
    archive itself, in a temporary folder. Idempotent: files already present are not fetched again.
    """
    dest = Path(home) / "data" / "canterbury"
    if all((dest / name).is_file() and (dest / name).stat().st_size > 0 for name in CANTERBURY_FILES):
        log.debug("datasets.canterbury.present", path=str(dest))
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sinkstream-brotli-") as tmp_name:
        tmp = Path(tmp_name)
        spec = f"brotli=={BROTLI_VERSION}"
        log.info("datasets.canterbury.download", package=spec)
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", spec, "-d", str(tmp)]
        proc = _run(cmd)
        if proc.returncode != 0:
            raise DatasetError(
                f"expected `{' '.join(cmd)}` to download the {spec} sdist, "
                f"got exit code {proc.returncode}:\n{_tail(proc.stderr or proc.stdout)}"
            )
        archives = sorted(tmp.glob("*.tar.gz"))
        if len(archives) != 1:
            found = sorted(p.name for p in tmp.iterdir())
            raise DatasetError(f"expected one brotli-{BROTLI_VERSION}.tar.gz from pip download, got {found}")
        _extract_members(archives[0], dest, CANTERBURY_FILES)
    log.info("datasets.canterbury.ready", path=str(dest))
    return dest


def _extract_members(archive: Path, dest: Path, names: tuple[str, ...]) -> None:
    """Copy `*/tests/testdata/<name>` for each of `names` out of a .tar.gz into `dest` (atomically per file)."""
    wanted = {f"*/tests/testdata/{name}": name for name in names}
    done: set[str] = set()
    with tarfile.open(archive, mode="r:gz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            for pattern, name in wanted.items():
                if name not in done and fnmatch.fnmatchcase(member.name, pattern):
                    src = tar.extractfile(member)
                    if src is None:  # pragma: no cover - isfile() members always have a payload
                        continue
                    part = dest / f".{name}.part"
                    with src, open(part, "wb") as out:
                        shutil.copyfileobj(src, out)
                    part.replace(dest / name)
                    done.add(name)
    missing = sorted(set(names) - done)
    if missing:
        raise DatasetError(f"expected {sorted(wanted)} in {archive.name}, missing {missing}")


def loghub_dir() -> Path:
    """Return the folder of Loghub 2k samples: `$SINKSTREAM_LOGHUB`, else `<repo>/../shared/data/loghub/`.

    Raises FileNotFoundError naming the folder looked at when it does not exist or holds no `*_2k.log`.
    """
    override = os.environ.get(LOGHUB_ENV)
    if override:
        path, origin = Path(override).expanduser(), f"${LOGHUB_ENV}"
    else:
        repo_root = Path(__file__).resolve().parents[2]
        path, origin = repo_root.parent / "shared" / "data" / "loghub", "the repository's ../shared/data/loghub"
    if not path.is_dir():
        raise DatasetMissingError(
            f"expected the Loghub samples in {path} (from {origin}), but that folder does not exist; "
            f"set ${LOGHUB_ENV} to the folder holding BGL_2k.log and the other *_2k.log files"
        )
    if not any(path.glob("*_2k.log")):
        raise DatasetMissingError(
            f"expected *_2k.log files in {path} (from {origin}), found "
            f"{sorted(p.name for p in path.iterdir())[:10]}"
        )
    return path


def bgl_labels(path: str | os.PathLike[str]) -> list[tuple[str, bool]]:
    """Split each line of a labelled BGL log into (line without its label field, is_anomaly).

    The first space-separated field is `-` for a normal line and an alert category (`APPREAD`, `KERNDTLB`,
    ...) for an anomalous one. Lines are split on newlines only (log text may hold other control
    characters); blank lines are skipped. Raises ValueError for a line with no label field.
    """
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    out: list[tuple[str, bool]] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        label, sep, rest = line.partition(" ")
        if not sep or not label:
            raise ValueError(
                f"{path}:{number}: expected '<label> <log line>' with label '-' or an alert category, "
                f"got {line[:80]!r}"
            )
        out.append((rest, label != "-"))
    return out


def fetch_all(home: Path) -> dict[str, Path]:
    """Fetch every data set into `home/data/` and return {name: folder}.

    `loghub` is not fetched (it lives in `../shared/`); it is included when found, else a warning is logged.
    """
    result = {"canterbury": canterbury(home)}
    try:
        result["loghub"] = loghub_dir()
    except FileNotFoundError as exc:
        log.warning("datasets.loghub.missing", error=str(exc))
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.evaluation.datasets fetch [--home DIR]`: fetch the data sets, print `name<TAB>path` lines."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluation.datasets", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="fetch every sample data set into $SINKSTREAM_HOME/data/")
    fetch.add_argument("--home", type=Path, default=None, help="default: $SINKSTREAM_HOME or ~/.cache/sinkstream")
    args = parser.parse_args(argv)
    # Keep stdout for the result lines; log events go to stderr.
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    )
    home = args.home if args.home is not None else sinkstream_home()
    try:
        paths = fetch_all(home)
    except DatasetError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    for name, path in paths.items():
        sys.stdout.write(f"{name}\t{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

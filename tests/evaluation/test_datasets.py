"""Tests for pipeline.evaluation.datasets: BGL labels, the Loghub folder, Canterbury and fail2ban fetching."""

from __future__ import annotations

import io
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from pipeline.evaluation import datasets
from pipeline.evaluation.datasets import DatasetError, bgl_labels, canterbury, loghub_dir

# --- Loghub / BGL -------------------------------------------------------------------------------------


def test_loghub_dir_finds_shared_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(datasets.LOGHUB_ENV, raising=False)
    path = loghub_dir()
    assert path.name == "loghub"
    assert (path / "BGL_2k.log").is_file()
    assert (path / "LICENSE").is_file()


def test_loghub_dir_honours_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "X_2k.log").write_text("line\n")
    monkeypatch.setenv(datasets.LOGHUB_ENV, str(tmp_path))
    assert loghub_dir() == tmp_path


def test_loghub_dir_missing_folder_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    monkeypatch.setenv(datasets.LOGHUB_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match="SINKSTREAM_LOGHUB") as info:
        loghub_dir()
    assert str(missing) in str(info.value)


def test_loghub_dir_without_logs_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("no logs here\n")
    monkeypatch.setenv(datasets.LOGHUB_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"\*_2k\.log"):
        loghub_dir()


def test_bgl_2k_has_2000_lines_and_143_anomalies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(datasets.LOGHUB_ENV, raising=False)
    rows = bgl_labels(loghub_dir() / "BGL_2k.log")
    assert len(rows) == 2000
    assert sum(is_anomaly for _, is_anomaly in rows) == 143 == datasets.BGL_2K_ANOMALIES
    # The label field is gone: every line now starts with the epoch-seconds field of BGL.
    assert all(text.split(" ", 1)[0].isdigit() for text, _ in rows)
    assert rows[0] == (
        "1117838570 2005.06.03 R02-M1-N0-C:J12-U11 2005-06-03-15.42.50.675872 R02-M1-N0-C:J12-U11 "
        "RAS KERNEL INFO instruction cache parity error corrected",
        False,
    )


def test_bgl_labels_parses_label_field(tmp_path: Path) -> None:
    log = tmp_path / "bgl.log"
    # CRLF endings, a blank line, a vertical tab inside a line (must not split it), no final newline.
    log.write_bytes(b"- 1 normal line\r\nKERNDTLB 2 data TLB error\n\n- 3 odd\x0bchar\nAPPREAD 4 read failed")
    assert bgl_labels(log) == [
        ("1 normal line", False),
        ("2 data TLB error", True),
        ("3 odd\x0bchar", False),
        ("4 read failed", True),
    ]


def test_bgl_labels_rejects_line_without_label(tmp_path: Path) -> None:
    log = tmp_path / "bgl.log"
    log.write_text("- 1 ok\nnolabelhere\n")
    with pytest.raises(ValueError, match=r"bgl\.log:2: expected '<label> <log line>'.*'nolabelhere'"):
        bgl_labels(log)


# --- Canterbury ----------------------------------------------------------------------------------------


def _fake_sdist(path: Path, names: list[str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            data = f"contents of {name}\n".encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_extract_members_takes_only_testdata(tmp_path: Path) -> None:
    archive = tmp_path / "brotli-1.2.1.tar.gz"
    _fake_sdist(archive, [
        "brotli-1.2.1/tests/testdata/alice29.txt",
        "brotli-1.2.1/tests/testdata/alice29.txt.compressed",
        "brotli-1.2.1/docs/alice29.txt",
        "brotli-1.2.1/tests/testdata/lcet10.txt",
    ])
    dest = tmp_path / "out"
    dest.mkdir()
    datasets._extract_members(archive, dest, ("alice29.txt", "lcet10.txt"))
    assert sorted(p.name for p in dest.iterdir()) == ["alice29.txt", "lcet10.txt"]
    assert (dest / "alice29.txt").read_text() == "contents of brotli-1.2.1/tests/testdata/alice29.txt\n"
    with pytest.raises(DatasetError, match=r"missing \['plrabn12.txt'\]"):
        datasets._extract_members(archive, dest, ("alice29.txt", "plrabn12.txt"))


def test_canterbury_present_files_are_not_fetched(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder = tmp_path / "data" / "canterbury"
    folder.mkdir(parents=True)
    for name in datasets.CANTERBURY_FILES:
        (folder / name).write_text("x")

    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError("canterbury() ran a subprocess although every file was present")

    monkeypatch.setattr(datasets, "_run", no_subprocess)
    assert canterbury(tmp_path) == folder


def test_canterbury_reports_pip_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def failing_pip(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for brotli==1.2.1")

    monkeypatch.setattr(datasets, "_run", failing_pip)
    with pytest.raises(DatasetError, match="exit code 1:\nERROR: No matching distribution"):
        canterbury(tmp_path)


@pytest.mark.integration
def test_canterbury_downloads_the_four_texts(tmp_path: Path) -> None:
    folder = canterbury(tmp_path)
    assert folder == tmp_path / "data" / "canterbury"
    assert sorted(p.name for p in folder.iterdir()) == sorted(datasets.CANTERBURY_FILES)
    assert (folder / "plrabn12.txt").stat().st_size > 400_000
    assert "Alice" in (folder / "alice29.txt").read_text(encoding="latin-1")


# --- CLI -----------------------------------------------------------------------------------------------


@pytest.fixture
def keep_structlog_config() -> Iterator[None]:
    """main() configures structlog for the CLI; put the process-wide configuration back afterwards."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.mark.usefixtures("keep_structlog_config")
def test_main_fetch_prints_name_and_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[Path] = []

    def fake_fetch_all(home: Path) -> dict[str, Path]:
        seen.append(home)
        return {"canterbury": home / "data" / "canterbury"}

    monkeypatch.setattr(datasets, "fetch_all", fake_fetch_all)
    monkeypatch.setenv("SINKSTREAM_HOME", str(tmp_path))
    assert datasets.main(["fetch"]) == 0
    assert seen == [tmp_path]
    assert capsys.readouterr().out == f"canterbury\t{tmp_path / 'data' / 'canterbury'}\n"


@pytest.mark.usefixtures("keep_structlog_config")
def test_main_fetch_failure_exits_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(home: Path) -> dict[str, Path]:
        raise DatasetError("expected X, got Y")

    monkeypatch.setattr(datasets, "fetch_all", broken)
    assert datasets.main(["fetch", "--home", str(tmp_path)]) == 1
    assert "error: expected X, got Y" in capsys.readouterr().err

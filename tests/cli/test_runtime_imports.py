"""The service image installs `pip install .` without extras: the command line and the service must import
without the evaluation/benchmark libraries (they are imported only by the commands that use them)."""

from __future__ import annotations

import json
import subprocess
import sys

EXTRAS_ONLY = ("matplotlib", "sklearn", "scipy", "tabulate", "pexpect", "peft")


def test_command_line_and_service_import_no_eval_or_bench_library():
    code = (
        "import json, sys\n"
        "import pipeline.cli.main, pipeline.cli.run, pipeline.service.service, pipeline.service.wiring\n"
        "pipeline.cli.main.build_parser()\n"
        f"print(json.dumps(sorted(m for m in {list(EXTRAS_ONLY)!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_eval_libraries_are_loaded_when_a_metric_or_chart_is_made(tmp_path):
    """The lazy imports are real: computing a metric and writing a table and a chart pull the libraries in."""
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from pipeline.evaluation import anomaly_report as ar, plots, tables\n"
        "ar.roc_auc([1.0, 2.0], [False, True]); tables.markdown_table(['a'], [[1.0]])\n"
        f"png = Path({str(tmp_path / 'x.png')!r})\n"
        "plots.save_figure(png, [plots.Panel('t', 'x', 'y', {'s': ([1, 2], [1, 2])})])\n"
        "print(json.dumps(sorted(m for m in ['matplotlib', 'sklearn', 'tabulate'] if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["matplotlib", "sklearn", "tabulate"]
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"

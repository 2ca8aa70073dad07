"""Render deploy/helm/sinkstream offline with Helm's own template engine (the helm-python-sdk wheel binds
libhelm_c, a C ABI over the Helm v4 Go SDK, so no `helm` binary and no cluster are needed).

    python scripts/render_chart.py [-f VALUES.yaml] [--release NAME] [--namespace NS] [-o OUT.yaml]

Prints the manifests like `helm template` does (`---` + `# Source:` per template, NOTES.txt left out). The
chart's values.schema.json is enforced; a `fail`/`required` in a template or a schema violation exits 1 with
Helm's message. Used by scripts/render-deploy.sh and tests/deploy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import helm_python as helm

CHART = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "sinkstream"


def render(values_file: Path | None = None, *, release: str = "sinkstream", namespace: str = "sinkstream",
           chart: Path = CHART) -> str:
    """Manifests of `chart` with `values_file` over its defaults, as one multi-document YAML string.

    Raises helm_python.HelmError (HelmValuesError, HelmRenderError, ...) when Helm rejects the values.
    """
    values = helm.values_from_yaml(values_file.read_text()) if values_file else {}
    manifests = helm.Chart.load(chart).render(values=values, name=release, namespace=namespace,
                                              is_install=True)
    out = []
    for source in sorted(manifests):
        text = manifests[source]
        if source.endswith("NOTES.txt") or not text.strip():
            continue
        for doc in text.split("\n---\n"):
            if doc.strip():
                out.append(f"---\n# Source: {source}\n{doc.strip()}\n")
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-f", "--values", type=Path, help="values file over the chart's values.yaml")
    parser.add_argument("--release", default="sinkstream")
    parser.add_argument("--namespace", default="sinkstream")
    parser.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    args = parser.parse_args(argv)
    try:
        text = render(args.values, release=args.release, namespace=args.namespace)
    except helm.HelmError as exc:
        print(f"render failed ({args.values or 'chart defaults'}): {exc}", file=sys.stderr)
        return 1
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

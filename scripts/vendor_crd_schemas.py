"""Extract the openAPIV3Schema of the CRDs the chart uses into deploy/schemas/*.json.

Run when bumping the vendored schemas, with the CRD files of a checkout of each project:

    python scripts/vendor_crd_schemas.py KEDA_CHECKOUT PROMETHEUS_OPERATOR_CHECKOUT

Writes one file per (group, kind, version): `<group>_<kind>_<version>.json`. Update deploy/schemas/README.md with
the commits used.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "deploy" / "schemas"
CRDS = {
    0: ["config/crd/bases/keda.sh_scaledobjects.yaml", "config/crd/bases/keda.sh_triggerauthentications.yaml"],
    1: ["example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml",
        "example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml"],
}


def main(checkouts: list[str]) -> None:
    if len(checkouts) != 2:
        raise SystemExit(f"expected 2 checkouts (KEDA, prometheus-operator), got {len(checkouts)}")
    for index, paths in CRDS.items():
        for rel in paths:
            crd = yaml.safe_load((Path(checkouts[index]) / rel).read_text())
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = version["schema"]["openAPIV3Schema"]
                name = f"{group}_{kind}_{version['name']}.json".lower()
                (OUT / name).write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
                print(f"{rel} -> deploy/schemas/{name}")


if __name__ == "__main__":
    main(sys.argv[1:])

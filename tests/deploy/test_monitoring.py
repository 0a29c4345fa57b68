"""The Grafana dashboard queries metrics genserve really exports, by labels they really have, and ships as
a ConfigMap Grafana's sidecar picks up."""

from __future__ import annotations

import json
import re

import pytest

from genserve.service.metrics import DEFINITIONS
from tests.deploy.manifests import K8S, KUBECTL, kustomize_build

DASHBOARD = K8S / "monitoring" / "dashboards" / "genserve.json"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def exported_series() -> dict[str, set[str]]:
    """Every series name genserve exports, with its labels (histograms as their three series)."""
    series = {}
    for name, (kind, _, labels, _) in DEFINITIONS.items():
        if kind == "histogram":
            series[f"{name}_bucket"] = {*labels, "le"}
            series[f"{name}_sum"] = set(labels)
            series[f"{name}_count"] = set(labels)
        else:
            series[name] = set(labels)
    return series


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def expressions() -> list[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets") or []]
    for variable in dashboard()["templating"]["list"]:
        if variable.get("type") == "query":
            exprs.append(variable["definition"])
    return exprs


def test_every_panel_has_a_query():
    panels = [p for p in dashboard()["panels"] if p["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel.get("targets") and all(t.get("expr") for t in panel["targets"]), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_queries_use_exported_metrics_and_their_labels():
    series = exported_series()
    for expr in expressions():
        names = set(re.findall(r"\bgenserve_\w+", expr))
        assert names, expr
        unknown = names - set(series)
        assert not unknown, f"not exported by service/metrics.py: {unknown} in {expr}"
        labels = set().union(*(series[n] for n in names))
        for selector in re.findall(r"genserve_\w+\{([^}]*)\}", expr):
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
                assert label in labels, f"{label} is not a label of {names}: {expr}"
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            for label in (g.strip() for g in group.split(",")):
                assert label in labels, f"grouping by {label}, not a label of {names}: {expr}"
        for metric in re.findall(r"histogram_quantile\([^,]+,.*?(genserve_\w+)", expr):
            assert metric.endswith("_bucket"), expr


def test_dashboard_covers_every_metric():
    """A metric added to service/metrics.py belongs on the dashboard too."""
    used = {re.sub("|".join(f"{s}$" for s in HISTOGRAM_SUFFIXES), "", n)
            for expr in expressions() for n in re.findall(r"\bgenserve_\w+", expr)}
    missing = set(DEFINITIONS) - used
    assert not missing, f"not on the dashboard: {sorted(missing)}"


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed: cannot run `kubectl kustomize`")
def test_dashboard_configmap_for_grafanas_sidecar():
    (configmap,) = [d for d in kustomize_build(K8S / "monitoring") if d["kind"] == "ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["data"] == {"genserve.json": DASHBOARD.read_text()}

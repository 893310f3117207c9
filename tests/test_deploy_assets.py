"""deploy/ assets for Prometheus, Alertmanager and Grafana: checked by the real tools and
against the metrics qcloop really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from qcloop.monitor.core.config import MonitoringConfig, QcloopConfig
from qcloop.monitor.core.events import (
    CaseFailed,
    CaseScored,
    DriftAlert,
    FeedbackReceived,
    ModelRefined,
    ModelVersionPromoted,
    ModelVersionRegistered,
    ServiceInfo,
    WindowChanged,
    WindowStats,
)
from qcloop.monitor.core.plugin_manager import make_plugin_manager
from qcloop.plugins.prometheus.exporter import service_metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules" / "qcloop.rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "rules" / "qcloop.rules.test.yml"
ALERTMANAGER_YML = DEPLOY / "alertmanager" / "alertmanager.yml"
DASHBOARD = DEPLOY / "grafana" / "qcloop-dashboard.json"

#: metrics of Prometheus itself that the assets may use besides qcloop's.
PROMETHEUS_METRICS = {"up"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(
            f"{name} is not installed (Debian packages prometheus / prometheus-alertmanager; "
            ".ci/run installs them)"
        )
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def test_promtool_checks_the_rules() -> None:
    out = _run(_tool("promtool"), "check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_promtool_checks_the_config() -> None:
    out = _run(_tool("promtool"), "check", "config", str(PROMETHEUS_YML))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout + out.stderr


def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    out = _run(_tool("promtool"), "test", "rules", str(RULES_TEST))
    assert out.returncode == 0, out.stdout + out.stderr
    tested = {
        t["alertname"]
        for group in yaml.safe_load(RULES_TEST.read_text())["tests"]
        for t in group.get("alert_rule_test", [])
    }
    assert tested == {
        "QcloopOodFractionHigh",
        "QcloopPdcShift",
        "QcloopMonitorDown",
        "QcloopServeQcDrift",
    }


def test_amtool_checks_the_alertmanager_config() -> None:
    out = _run(_tool("amtool"), "check-config", str(ALERTMANAGER_YML))
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["alertname=QcloopOodFractionHigh", "job=qcloop-monitor", "view=SA"], "qcloop-monitor"),
        (["alertname=QcloopPdcShift", "job=qcloop-monitor", "view=LA"], "qcloop-monitor"),
        # a serve pod's series never reach the monitor's webhook, whatever their name
        (["alertname=QcloopOodFractionHigh", "job=qcloop-serve", "view=SA"], "null"),
        (["alertname=QcloopServeQcDrift", "job=qcloop-serve", "view=SA"], "null"),
    ],
)
def test_alertmanager_routes_only_the_monitors_drift_to_its_webhook(
    labels: list[str], receiver: str
) -> None:
    args = ["config", "routes", "test", f"--config.file={ALERTMANAGER_YML}", *labels]
    out = _run(_tool("amtool"), *args)
    assert out.stdout.strip() == receiver, out.stdout + out.stderr


def test_rule_limits_and_endpoints_match_the_monitor_defaults() -> None:
    defaults = MonitoringConfig()
    rules = {
        r["alert"]: r
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    ood = " ".join(rules["QcloopOodFractionHigh"]["expr"].split())
    assert f'qcloop_ood_fraction{{job="qcloop-monitor"}} > {defaults.ood_fraction_limit}' in ood
    assert f'qcloop_window_cases{{job="qcloop-monitor"}} >= {defaults.min_cases}' in ood
    shift = " ".join(rules["QcloopPdcShift"]["expr"].split())
    assert f") > {defaults.median_pdc_shift_limit}" in shift
    for name in ("QcloopOodFractionHigh", "QcloopPdcShift"):
        assert rules[name]["labels"]["severity"]
    prom = yaml.safe_load(PROMETHEUS_YML.read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "qcloop-monitor"]
    target = f"{defaults.http_host}:{defaults.http_port}"
    assert job["static_configs"][0]["targets"] == [target]
    assert prom["rule_files"] == ["rules/qcloop.rules.yml"]
    am = yaml.safe_load(ALERTMANAGER_YML.read_text())
    (receiver,) = [r for r in am["receivers"] if r["name"] == "qcloop-monitor"]
    hook = receiver["webhook_configs"][0]
    # the webhook is on the monitor's one endpoint, beside the /metrics Prometheus scrapes
    assert hook["url"] == f"http://{target}/alertmanager"
    auth = hook["http_config"]["authorization"]
    assert auth["type"] == "Bearer" and auth["credentials_file"]
    route = am["route"]["routes"][0]
    assert route["receiver"] == "qcloop-monitor" and "view" in am["route"]["group_by"]


def _one_event_of_each_kind(service: str) -> list[object]:
    """One event of every kind that feeds the QC metrics, from ``service``."""
    cand = {
        s: {"pdc": 0.8, "phd_mm": 5.0, "phd95_mm": 4.0, "penalised": False}
        for s in ["LV", "MYO", "RV"]
    }
    record = {
        "view": "SA",
        "phase": "ED",
        "decision_structure": "RV",
        "candidates": [cand],
        "fences": {"pdc_low": 0.5, "phd_high": 30.0},
        "ood": True,
        "model": {"version": "1"},
        "runtime": {"name": "torch"},
        "latency_s": 0.1,
    }
    stats = WindowStats(1, 1.0, 0.8)
    return [
        CaseScored(record, service=service),
        CaseFailed("read", "unreadable", source="a.nii.gz", view="SA", service=service),
        WindowChanged("SA", stats, 0.8, "case", model_version="1", service=service),
        DriftAlert("SA", "qcloop", ("x",), stats, 0.8, {"version": "1"}, "t", service=service),
        ModelRefined("SA", "run", {}, service=service),
        FeedbackReceived(
            "SA", "c-1", {"RV": {"dice": 0.7, "pdc": 0.8}}, True, True, service=service
        ),
        ModelVersionRegistered("qcloop-SA", "1", {}, service=service),
        ModelVersionPromoted("qcloop-SA", "1", "champion", None, service=service),
    ]


def exported_metric_names() -> set[str]:
    """Every sample name the Prometheus exporter can export for a service: from its registry's
    families (with the _total/_bucket/_sum/_count suffixes) and from a real exposition after
    one event of each kind, delivered through the event hooks."""
    pm = make_plugin_manager(load_entrypoints=False)
    cfg = QcloopConfig(monitoring=MonitoringConfig(http_port=0))  # no HTTP endpoint
    service = ServiceInfo(kind="monitor", config=cfg)
    pm.service_started(service)
    try:
        metrics = service_metrics(service.id)
        assert metrics is not None, "the exporter made no metrics for the service"
        names: set[str] = set()
        for family in metrics.registry.collect():
            if family.type == "counter":
                names |= {f"{family.name}_total", f"{family.name}_created"}
            elif family.type == "histogram":
                names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count", "created")}
            else:
                names.add(family.name)
        for event in _one_event_of_each_kind(service.id):
            assert pm.emit(event) == 0, event
        exposition = metrics.exposition().decode()
    finally:
        pm.service_stopped(service)
    from prometheus_client.parser import text_string_to_metric_families

    sampled = {s.name for f in text_string_to_metric_families(exposition) for s in f.samples}
    assert sampled <= names, sampled - names
    assert {"qcloop_pdc_bucket", "qcloop_cases_scored_total", "qcloop_ood_fraction"} <= sampled
    assert {"qcloop_case_errors_total", "qcloop_pdc_reference_median"} <= sampled
    return names


#: PromQL words that look like metric names but are functions, keywords or aggregations.
_PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "by", "without", "on", "ignoring", "group_left",
    "group_right", "and", "or", "unless", "rate", "irate", "increase", "changes", "delta",
    "histogram_quantile", "label_values", "absent", "bool", "offset", "topk", "bottomk",
    "quantile", "stddev", "clamp_min", "clamp_max", "time", "vector", "scalar",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (labels, strings, durations removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    words = set(re.findall(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)", text))
    return {w for w in words if w not in _PROMQL_WORDS}


def _dashboard_queries(dash: dict) -> list[tuple[str, str]]:
    queries = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            queries.append((panel["title"], target["expr"]))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            queries.append((f"variable {var['name']}", q))
    for ann in dash.get("annotations", {}).get("list", []):
        if ann.get("expr"):
            queries.append((f"annotation {ann['name']}", ann["expr"]))
    return queries


def test_promql_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.5, sum by (le, view) (rate(qcloop_pdc_bucket{view=~"$view"}[5m])))'
        ' / on (view) qcloop_window_cases and up{job="x"}'
    )
    assert promql_metric_names(expr) == {"qcloop_pdc_bucket", "qcloop_window_cases", "up"}
    assert promql_metric_names("label_values(qcloop_cases_scored_total, view)") == {
        "qcloop_cases_scored_total",
        "view",
    }


def test_dashboard_queries_only_metrics_qcloop_exports() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exported = exported_metric_names()
    assert dash["panels"], "the dashboard has no panels"
    used: set[str] = set()
    for title, expr in _dashboard_queries(dash):
        names = promql_metric_names(expr)
        if expr.startswith("label_values("):
            names = {expr[len("label_values(") :].split(",")[0].strip()}
        unknown = names - exported - PROMETHEUS_METRICS
        assert not unknown, f"{title}: {expr!r} uses metrics qcloop does not export: {unknown}"
        used |= names
    for panel in dash["panels"]:
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
    # the list: pDC/pHD quantiles, OoD fraction, flagged rate, latency, lifecycle, fences
    for needed in (
        "qcloop_pdc_bucket",
        "qcloop_phd_mm_bucket",
        "qcloop_ood_fraction",
        "qcloop_cases_flagged_total",
        "qcloop_case_latency_seconds_bucket",
        "qcloop_refinements_total",
        "qcloop_promotions_total",
        "qcloop_fence_pdc_low",
    ):
        assert needed in used, f"the dashboard shows no {needed}"


def test_rules_query_only_metrics_qcloop_exports() -> None:
    exported = exported_metric_names()
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        records = {r["record"] for r in group["rules"] if "record" in r}
        for rule in group["rules"]:
            unknown = promql_metric_names(rule["expr"]) - exported - PROMETHEUS_METRICS - records
            assert not unknown, f"{rule.get('alert') or rule.get('record')}: {unknown}"


def test_the_monitor_manifest_matches_the_monitor_command() -> None:
    """deploy/k8s/monitor/monitor.yaml: one replica recreated (never two monitors on one OUT),
    the output folder on a volume, the command's own options, the webhook and metrics bound for
    the pod and published by its Service, probes on the webhook's /healthz, serve's hardening."""
    from qcloop.monitor.cli.monitor import monitor
    from qcloop.monitor.core.config import QcloopConfig

    path = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "monitor" / "monitor.yaml"
    by_kind = {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}
    deployment = by_kind["Deployment"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["qcloop", "monitor"]
    options = {opt for p in monitor.params for opt in p.opts}
    given = [a for a in container["args"] if a.startswith("--")]
    assert set(given) <= options, set(given) - options
    args = container["args"]
    out = args[args.index("--out") + 1]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert any(out.startswith(p) and n == "data" for p, n in mounts.items())
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "qcloop-monitor-data"
    cfg = QcloopConfig.model_validate(
        yaml.safe_load(by_kind["ConfigMap"]["data"]["config.yaml"])
    ).monitoring
    assert cfg.http_host == "0.0.0.0" and "--webhook" in args
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": cfg.http_port}  # /metrics, /healthz and the webhook: one port
    service = {p["targetPort"] for p in by_kind["Service"]["spec"]["ports"]}
    assert service == set(ports)
    for probe in ("livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    secret_env = next(e for e in container["env"] if e["name"] == cfg.webhook_secret_env)
    assert secret_env["valueFrom"]["secretKeyRef"]["name"]
    hardening = container["securityContext"]
    assert hardening["readOnlyRootFilesystem"] and not hardening["allowPrivilegeEscalation"]
    assert hardening["capabilities"]["drop"] == ["ALL"] and pod["securityContext"]["runAsNonRoot"]
    assert pod["automountServiceAccountToken"] is False
    endpoint = by_kind["ServiceMonitor"]["spec"]["endpoints"][0]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"

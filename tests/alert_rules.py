"""`promtool test rules` on what a running system exports: scrape every
program's /metrics, turn each scrape into promtool input series, and check
which alerts of supervisor/alerts.yml fire."""

from __future__ import annotations

import json
import math
import re
import subprocess
import urllib.request
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import REPO, Supervisor

ALERTS = REPO / "supervisor" / "alerts.yml"
#: One sample a minute: each scrape stands for this many minutes of a steady system.
MINUTES_PER_SCRAPE = 10

Scrape = dict[str, float]  # series ("name{labels}") -> value


def metrics_targets(system: Supervisor) -> dict[str, str]:
    """program -> host:port of its /metrics: the fixed programs and every worker
    that announced itself (the same files Prometheus' file_sd reads)."""
    targets = {program: f"127.0.0.1:{port}" for program, port in system.metrics_ports.items()}
    for path in sorted((system.var_dir / "run" / "workers").glob("*.targets.json")):
        for group in json.loads(path.read_text()):
            targets[group["labels"]["program"]] = group["targets"][0]
    return targets


def scrape(targets: dict[str, str]) -> Scrape:
    """Every sample of every target, labelled as Prometheus would (job, instance),
    plus `up` 1 for each target that answered."""
    series: Scrape = {}
    for address in targets.values():
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        base = {"job": "talker", "instance": address}
        series[series_name("up", base)] = 1.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if math.isfinite(sample.value):
                    series[series_name(sample.name, {**sample.labels, **base})] = sample.value
    return series


def series_name(name: str, labels: dict[str, str]) -> str:
    def quoted(value: str) -> str:
        return json.dumps(value)  # Prometheus' escaping of \\ and " is JSON's

    inside = ",".join(f"{key}={quoted(value)}" for key, value in sorted(labels.items()))
    return f"{name}{{{inside}}}"


Expected = dict[str, list[dict[str, str]]]  # alert name -> labels of each firing alert


def promtool_test(
    scrapes: list[Scrape], checks: list[tuple[int, Expected]], tmp: Path
) -> subprocess.CompletedProcess[str]:
    """Runs `promtool test rules`: scrape i holds from minute i*MINUTES_PER_SCRAPE
    for MINUTES_PER_SCRAPE minutes; each check is (minute, expected), expected
    mapping alert names to the labels of every alert that must be firing then
    (an empty list: none may; names not given are not checked)."""
    names = sorted({name for scrape in scrapes for name in scrape})
    input_series = []
    for name in names:
        values = []
        for scrape in scrapes:
            value = scrape.get(name)
            # A series a later scrape lacks (a restarted process) is absent then.
            text = "_" if value is None else repr(value)
            values.extend([text] * MINUTES_PER_SCRAPE)
        input_series.append({"series": name, "values": " ".join(values)})
    test = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": input_series,
                "alert_rule_test": [
                    {
                        "eval_time": f"{minute}m",
                        "alertname": alertname,
                        "exp_alerts": [
                            {
                                "exp_labels": labels,
                                "exp_annotations": annotations(alertname, labels),
                            }
                            for labels in alerts
                        ],
                    }
                    for minute, expected in checks
                    for alertname, alerts in sorted(expected.items())
                ],
            }
        ],
    }
    path = tmp / "alerts_test.yml"
    path.write_text(yaml.safe_dump(test, width=1 << 20))
    return subprocess.run(
        ["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=120
    )


def annotations(alertname: str, labels: dict[str, str]) -> dict[str, str]:
    """The rule's annotations as Prometheus renders them for an alert with `labels`
    (the rules use only `{{ $labels.NAME }}`)."""
    rule = next(
        rule
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
        if rule["alert"] == alertname
    )
    return {
        key: re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), text)
        for key, text in rule.get("annotations", {}).items()
    }


def alert_names() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["alert"] for group in rules["groups"] for rule in group["rules"]]


def severity(alertname: str) -> str:
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == alertname:
                return str(rule["labels"]["severity"])
    raise KeyError(alertname)

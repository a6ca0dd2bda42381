"""The monitoring config: promtool accepts the scrape config and the alert
rules, and Debian's real Prometheus scrapes every running program as up."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml

from tests.alert_rules import metrics_targets
from tests.processes import REPO, free_port

CONFIG = REPO / "supervisor" / "prometheus.yml"


def test_promtool_accepts_the_config_and_rules() -> None:
    result = subprocess.run(
        ["promtool", "check", "config", str(CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout + result.stderr


def test_real_prometheus_scrapes_every_program_as_up(system, tmp_path: Path) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    config["global"]["scrape_interval"] = "1s"
    fixed = [f"127.0.0.1:{port}" for port in system.metrics_ports.values()]
    config["scrape_configs"][0]["static_configs"][0]["targets"] = fixed
    # The workers, through the files they announce themselves in (file_sd).
    announced = str(system.var_dir / "run" / "workers" / "*.targets.json")
    config["scrape_configs"][0]["file_sd_configs"][0]["files"] = [announced]
    targets = list(metrics_targets(system).values())
    assert len(targets) > len(fixed), "no worker announced its /metrics"
    shutil.copy(CONFIG.parent / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        health: dict[str, str] = {}
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/v1/targets", timeout=2
                ) as answer:
                    active = json.load(answer)["data"]["activeTargets"]
                health = {t["labels"]["instance"]: t["health"] for t in active}
            except OSError:
                pass
            if len(health) == len(targets) and set(health.values()) == {"up"}:
                break
            time.sleep(0.5)
        assert set(health) == set(targets) and set(health.values()) == {"up"}, health
    finally:
        process.terminate()
        process.wait(30)

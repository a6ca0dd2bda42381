"""The alert rules on a healthy running system: promtool, fed with what every
program (workers included) exports, finds no alert firing."""

from __future__ import annotations

from pathlib import Path

from tests.alert_rules import alert_names, metrics_targets, promtool_test, scrape
from tests.processes import Supervisor


def test_a_healthy_system_fires_no_alert(system: Supervisor, tmp_path: Path) -> None:
    targets = metrics_targets(system)
    # The workers announce themselves too, so Prometheus (file_sd) and this test see them.
    assert any(name.startswith("worker_") for name in targets), targets
    series = scrape(targets)
    # What the rules read is there: every program's readiness and memory ceiling,
    # and the queue as the workers see it.
    for name in ("talker_ready{", "talker_memory_limit_bytes{", "talker_jobs_queue_depth{"):
        assert any(key.startswith(name) for key in series), name
    assert all(
        value > 0 for key, value in series.items() if key.startswith("talker_memory_limit_bytes{")
    ), "every program has a memory ceiling by default"
    # Twenty steady minutes: past every rule's `for`, and the restart window sees no change.
    result = promtool_test([series, series], [(19, {name: [] for name in alert_names()})], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr

"""Guard: how many held-out attacks each check blocks, how many benign
questions it refuses, and what it costs per message.

The cases (bench/guard_cases.py) are not among the examples the semantic check
is fitted on; the bench stops if they overlap. Times are printed as ms and as a
ratio to the regex pass over the same messages in the same process, since the
machine is shared and noisy.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.guard_cases import ATTACKS, BENIGN
from bench.tables import percentile, print_table
from services.chat.config import ChatSettings
from services.chat.guard import Guard, language_of, normalise
from services.chat.guard_examples import ATTACKS as FIT_ATTACKS
from services.chat.guard_examples import BENIGN as FIT_BENIGN
from services.chat.semantic_guard import L2_PENALTY, fit_logistic

ROUNDS = 3
FOLDS = 10
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def rate(hits: list[bool]) -> str:
    return f"{sum(hits)}/{len(hits)} ({100 * sum(hits) / len(hits):.0f}%)" if hits else "-"


def main() -> None:
    overlap = (set(ATTACKS) | set(BENIGN)) & (set(FIT_ATTACKS) | set(FIT_BENIGN))
    if overlap:
        raise SystemExit(f"bench cases overlap the guard's fitting examples: {sorted(overlap)}")

    with tempfile.TemporaryDirectory() as cache:
        settings = ChatSettings(cache_dir=Path(cache))
        # Until the semantic check is ready (it loads in a background thread).
        started = time.perf_counter()
        _ = Guard.from_settings(settings).semantic
        cold_s = time.perf_counter() - started
        started = time.perf_counter()
        guard = Guard.from_settings(settings)
        _ = guard.semantic
        warm_s = time.perf_counter() - started
    regex_only = Guard(settings.guard_patterns)
    semantic = guard.semantic
    assert semantic is not None

    cases = [(text, True) for text in ATTACKS] + [(text, False) for text in BENIGN]
    by_regex = {text: regex_only.check(text) is not None for text, _ in cases}
    scores = {text: semantic.score(normalise(text)) for text, _ in cases}
    by_semantic = {text: scores[text] >= semantic.threshold for text, _ in cases}
    by_both = {text: guard.check(text) is not None for text, _ in cases}

    def rows_for(verdicts: dict[str, bool]) -> list[str]:
        row = []
        for attack in (True, False):
            for language in ("en", "zh", None):
                hits = [
                    verdicts[text]
                    for text, is_attack in cases
                    if is_attack is attack and language in (None, language_of(text))
                ]
                row.append(rate(hits))
        return row

    # Wall time is what a caller waits; CPU time (of this one thread) is what the
    # check costs, and stays put when other programs crowd the 2 cores.
    times: dict[str, list[float]] = {"regex": [], "semantic": [], "both": []}
    cpu_times: dict[str, list[float]] = {"regex": [], "semantic": [], "both": []}
    checks = {
        "regex": regex_only.check,
        "semantic": lambda text: semantic.score(normalise(text)),
        "both": guard.check,
    }
    for _ in range(ROUNDS):
        for name, check in checks.items():
            for text, _ in cases:
                started, started_cpu = time.perf_counter(), time.thread_time()
                check(text)
                times[name].append((time.perf_counter() - started) * 1000)
                cpu_times[name].append((time.thread_time() - started_cpu) * 1000)
    baseline = percentile(times["regex"], 50)

    header = [
        "check",
        "blocked EN",
        "blocked ZH",
        "blocked all",
        "refused EN",
        "refused ZH",
        "false refusals",
        "ms p50",
        "ms p95",
        "CPU ms p50",
        "p50 / regex",
    ]
    rows = []
    for name, verdicts in (("regex", by_regex), ("semantic", by_semantic), ("both", by_both)):
        p50 = percentile(times[name], 50)
        rows.append(
            [
                name,
                *rows_for(verdicts),
                f"{p50:.2f}",
                f"{percentile(times[name], 95):.2f}",
                f"{percentile(cpu_times[name], 50):.2f}",
                f"{p50 / baseline:.0f}x",
            ]
        )
    print_table(
        f"Guard on {len(ATTACKS)} held-out attacks and {len(BENIGN)} benign questions "
        f"(threshold {semantic.threshold}; semantic check on 1 thread; "
        f"load average {os.getloadavg()[0]:.1f})",
        header,
        rows,
    )

    regex_misses = [text for text in ATTACKS if not by_regex[text]]
    print(
        f"\nAttacks no pattern catches: {len(regex_misses)}; the semantic check blocks "
        f"{sum(by_semantic[text] for text in regex_misses)} of them. Load: "
        f"{cold_s:.2f} s cold (embedding {len(FIT_ATTACKS) + len(FIT_BENIGN)} examples), "
        f"{warm_s:.2f} s with the examples cached."
    )

    # How the default threshold was chosen: 10-fold cross-validation on the
    # fitting examples alone (each fold scored by a classifier fitted without it).
    vectors, labels = semantic.example_vectors, semantic.example_labels
    fold_of = np.arange(len(labels)) % FOLDS
    held_out = np.empty(len(labels))
    for fold in range(FOLDS):
        weights = fit_logistic(vectors[fold_of != fold], labels[fold_of != fold], L2_PENALTY)
        logits = vectors[fold_of == fold] @ weights[:-1] + weights[-1]
        held_out[fold_of == fold] = 1 / (1 + np.exp(-logits))
    print_table(
        f"Semantic check alone, {FOLDS}-fold cross-validation on its "
        f"{int(labels.sum())} attack and {int((1 - labels).sum())} benign fitting examples",
        ["threshold", "blocked", "false refusals"],
        [
            [
                threshold,
                rate(list(held_out[labels == 1] >= threshold)),
                rate(list(held_out[labels == 0] >= threshold)),
            ]
            for threshold in THRESHOLDS
        ],
    )

    sweep = []
    for threshold in THRESHOLDS:
        blocked = [by_regex[t] or scores[t] >= threshold for t in ATTACKS]
        refused = [by_regex[t] or scores[t] >= threshold for t in BENIGN]
        sweep.append([threshold, rate(blocked), rate(refused)])
    print_table(
        "Both checks by threshold (held-out; the default was chosen on the fitting examples)",
        ["threshold", "blocked", "false refusals"],
        sweep,
    )

    wrong = [
        [f"{scores[text]:.2f}", "attack passed" if is_attack else "benign refused", text]
        for text, is_attack in cases
        if by_both[text] is not is_attack
    ]
    if wrong:
        print_table("Where both checks together are wrong", ["score", "what", "text"], wrong)

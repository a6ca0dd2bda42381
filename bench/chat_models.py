"""Which chat model, system prompt and sampling answer best? Every embedded
model is asked the question set of `bench/chat_questions.py` (30 English and
30 Chinese questions with one right answer, 10 open ones) through the real
engine, and scored: right answers per language, and the share of replies in
the question's language, speakable and short (the rules are written in that
module).

    python -m bench chat_models            # every model, the configured prompt
    BENCH_PROMPTS=all python -m bench chat_models   # also the candidate prompts
    BENCH_MODELS=qwen2.5-0.5b BENCH_SAMPLING=greedy python -m bench chat_models
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import numpy as np

from bench.chat_questions import QUESTIONS, Question, is_right, language_ok, short, speakable
from bench.tables import percentile, print_table
from services.chat.config import ChatSettings
from services.chat.engine import ChatEngine, GenerationParams, GenerationRun, build_engine
from services.chat.models import EMBEDDED

# Candidates the default prompts were chosen from (kept to re-run the choice):
# each maps a question to the system prompt it is asked with.
PROMPTS: dict[str, Callable[[str], str]] = {
    "default (per language)": ChatSettings().system_prompt_for,
    "one bilingual prompt": lambda _: (
        "You are Talker, a friendly digital human who talks with people out loud. Always "
        "reply in the language of the user's last message: in Chinese (简体中文) to "
        "Chinese, in English to English. Give a correct answer in one or two short "
        "sentences of plain spoken text, with no lists, markdown or emoji."
    ),
    "previous": lambda _: (
        "You are Talker, a friendly digital human. Answer in one to three short, clear "
        "sentences, in the language the user writes in. You have no tools and cannot read "
        "files, browse or run commands."
    ),
    "terse": lambda _: "Answer briefly in the language of the question.",
}


def ask(
    model: ChatEngine, question: Question, system: Callable[[str], str], params: GenerationParams
) -> tuple[str, GenerationRun, float]:
    prompt = model.prompt(
        [
            {"role": "system", "content": system(question.text)},
            {"role": "user", "content": question.text},
        ]
    )
    run = GenerationRun(prompt_tokens=prompt.tokens)
    started = time.perf_counter()
    text = "".join(model.generate(prompt, params, threading.Event(), run))
    return " ".join(text.split()), run, time.perf_counter() - started


def evaluate(
    model: ChatEngine, label: str, system: Callable[[str], str], params: GenerationParams
) -> list[object]:
    counts = {"en": [0, 0], "zh": [0, 0]}
    language = spoken = brief = 0
    failures: list[list[object]] = []
    speeds, seconds = [], []
    for question in QUESTIONS:
        text, run, elapsed = ask(model, question, system, params)
        seconds.append(elapsed)
        if run.first_token_s is not None and run.completion_tokens > 1:
            speeds.append((run.completion_tokens - 1) / max(1e-9, elapsed - run.first_token_s))
        right = True
        if question.answers:
            right = is_right(question, text)
            counts[question.language][0] += right
            counts[question.language][1] += 1
        checks = (
            language_ok(question, text),
            speakable(text),
            short(question, text, run.finish_reason == "stop"),
        )
        language, spoken, brief = language + checks[0], spoken + checks[1], brief + checks[2]
        if not (right and all(checks)):
            marks = "".join(
                m
                for m, ok in zip(
                    ("wrong ", "language ", "unspeakable ", "long "), (right, *checks), strict=True
                )
                if not ok
            )
            failures.append([question.text, marks.strip(), text[:100]])
    print_table(f"{label}: replies that failed a rule", ["question", "failed", "reply"], failures)
    total = len(QUESTIONS)
    return [
        label,
        f"{counts['en'][0]}/{counts['en'][1]}",
        f"{counts['zh'][0]}/{counts['zh'][1]}",
        f"{language}/{total}",
        f"{spoken}/{total}",
        f"{brief}/{total}",
        percentile(speeds, 50),
        percentile(seconds, 95),
    ]


def main() -> None:
    settings = ChatSettings()
    first = next(iter(PROMPTS))
    prompts = PROMPTS if os.environ.get("BENCH_PROMPTS") == "all" else {first: PROMPTS[first]}
    samplings = {
        "greedy": GenerationParams(96, 1.0, 1.0, True, settings.repetition_penalty),
        f"T={settings.temperature}": GenerationParams(
            96, settings.temperature, settings.top_p, False, settings.repetition_penalty
        ),
    }
    wanted = os.environ.get("BENCH_SAMPLING")
    if wanted:
        samplings = {k: v for k, v in samplings.items() if k.startswith(wanted)}
    rows = []
    names = os.environ.get("BENCH_MODELS", ",".join(EMBEDDED)).split(",")
    for name in names:
        model = build_engine(ChatSettings(model=name))
        model.load()
        for prompt_name, system in prompts.items():
            for sampling_name, params in samplings.items():
                model.rng = np.random.default_rng(0)  # type: ignore[attr-defined]
                label = f"{name} / {prompt_name} prompt / {sampling_name}"
                rows.append(evaluate(model, label, system, params))
    print_table(
        f"Question set: {len(QUESTIONS)} questions (30 EN + 30 ZH checkable, 10 open)",
        [
            "model / prompt / sampling",
            "EN right",
            "ZH right",
            "in question's language",
            "speakable",
            "short",
            "tok/s p50",
            "s/reply p95",
        ],
        rows,
    )


if __name__ == "__main__":
    main()

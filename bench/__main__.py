import sys

from bench import (
    animate_bench,
    asr_bench,
    chaos_bench,
    chat_bench,
    chat_models,
    gateway_bench,
    jobs_bench,
    synthesize_bench,
)

BENCHES = {
    "asr": asr_bench.main,
    "chat": chat_bench.main,
    "synthesize": synthesize_bench.main,
    "animate": animate_bench.main,
    "gateway": gateway_bench.main,
    "jobs": jobs_bench.main,
    "chaos": chaos_bench.main,
}
# Run on request only: a model comparison, not a speed benchmark.
EXTRA = {"chat_models": chat_models.main}

if __name__ == "__main__":
    names = sys.argv[1:] or list(BENCHES)
    for name in names:
        {**BENCHES, **EXTRA}[name]()

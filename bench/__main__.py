import sys

from bench import (
    animate_bench,
    asr_bench,
    chaos_bench,
    chat_bench,
    chat_engines,
    chat_models,
    gateway_bench,
    guard_bench,
    jobs_bench,
    load_bench,
    startup_bench,
    synthesize_bench,
    web_bench,
)

BENCHES = {
    "asr": asr_bench.main,
    "chat": chat_bench.main,
    "synthesize": synthesize_bench.main,
    "animate": animate_bench.main,
    "gateway": gateway_bench.main,
    "jobs": jobs_bench.main,
    "chaos": chaos_bench.main,
    "guard": guard_bench.main,
    "startup": startup_bench.main,
    "web": web_bench.main,
    "load": load_bench.main,
}
# Run on request only: comparisons of models and engines (long), not the product's speed.
EXTRA = {"chat_models": chat_models.main, "chat_engines": chat_engines.main}

if __name__ == "__main__":
    names = sys.argv[1:] or list(BENCHES)
    for name in names:
        {**BENCHES, **EXTRA}[name]()

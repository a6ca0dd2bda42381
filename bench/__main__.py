import sys

from bench import asr_bench, chat_bench

BENCHES = {"asr": asr_bench.main, "chat": chat_bench.main}

if __name__ == "__main__":
    names = sys.argv[1:] or list(BENCHES)
    for name in names:
        BENCHES[name]()

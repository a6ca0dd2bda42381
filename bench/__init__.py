"""Benchmarks that print tables; run with `make bench` (all) or
`python -m bench asr` (one). Speed is compared within one run."""

import os

# Benchmarks, like tests, never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

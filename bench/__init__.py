"""Benchmarks that print tables; run with `make bench` (all) or
`python -m bench asr` (one). Speed is compared within one run."""

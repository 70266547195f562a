"""Benchmarks: engine step times (engine_bench.py) and the serving load test (load_test.py)."""

"""Benchmarks: engine step times (engine_bench.py, on the shared helpers of runner_timing.py), extend
attention, TP, offline throughput, and the serving load test (load_test.py)."""

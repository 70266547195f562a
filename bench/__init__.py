"""Lab benchmarks and sweeps, run from a checkout's root as modules (``python -m bench.engine_bench``);
not installed. What users run against a live system (``pdserve bench``, ``soak``, ``goodput``) lives in
``pdserve.loadtest``."""

"""The prefill service (``pdserve prefill``): runs prompts in extend batches — chunked prefill under
a token budget, prefix reuse from the radix cache — and ships each request's KV pages and first
token to the decode instance that asked for it (``kvtransfer``). See ``servicer.py`` for the RPCs,
``job.py`` for one request's state and transfer, and ``server.py`` for startup.
"""

"""The decode service (``pdserve decode``): admits a request only when its KV pages can be
reserved, has a prefill instance fill them (``kvtransfer`` receiver), then runs it in a
continuous batch and streams tokens. See ``servicer.py`` for the RPCs and ``job.py`` for one
request's path.
"""

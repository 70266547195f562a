"""The gateway (``pdserve gateway``): what clients talk to. OpenAI-compatible REST (FastAPI on
uvicorn) and a public gRPC API over one pipeline: validate and tokenize → pick a (prefill, decode)
pair by policy → stream from decode → detokenize. See ``docs/ARCHITECTURE.md`` for the map.
"""

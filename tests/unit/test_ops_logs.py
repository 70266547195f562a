"""The operator's log lines: the instances' stats line computed from two load snapshots, the
gateway's access line, and the JSON log format carrying their fields."""

from __future__ import annotations

import json
import logging

from engine.load import EngineLoad
from engine.stats_log import Stats
from gateway.access_log import AccessEntry
from pdserve.logs import JSONFormatter


def snapshot(**kw: int) -> EngineLoad:
    base = dict(num_waiting=0, num_running=0, num_free_pages=100, num_total_pages=100, num_cached_pages=0,
                page_size=16, max_num_seqs=8)  # fmt: skip
    return EngineLoad(**(base | kw))  # type: ignore[arg-type]


def test_stats_are_rates_over_the_interval_and_the_load_at_its_end():
    a = snapshot(num_prompt_tokens=1000, num_cached_prompt_tokens=100, num_generated_tokens=50)
    b = snapshot(num_running=3, num_waiting=2, num_free_pages=60, num_cached_pages=10,
                 num_prompt_tokens=1400, num_cached_prompt_tokens=200, num_generated_tokens=250)  # fmt: skip
    s = Stats.between(a, b, kv_bytes=8_000_000, seconds=4.0)
    assert (s.prompt_tok_s, s.output_tok_s, s.kv_bytes_s) == (100.0, 50.0, 2_000_000.0)
    assert s.prefix_hit_rate == 0.25  # 100 of the interval's 400 prompt tokens came from the cache
    assert (s.num_used_pages, s.num_cached_pages, s.num_total_pages) == (30, 10, 100)
    assert s.line("decode") == (
        "decode stats: running 3, waiting 2 | in 100.0 tok/s, out 50.0 tok/s | KV pages 30/100 used "
        "(10 cached) | prefix cache hit 25.0% | KV transfer 2.00 MB/s"
    )


def test_an_idle_interval_has_no_hit_rate():
    s = Stats.between(snapshot(), snapshot(), kv_bytes=0, seconds=10.0)
    assert s.prefix_hit_rate is None and "prefix cache hit -" in s.line("prefill")


def test_access_line_names_the_request_its_outcome_and_instances():
    entry = AccessEntry("cmpl-1", "chat", 12, started=0.0, ttft_s=0.0412, num_output_tokens=7, status=429)
    entry.instances |= {"prefill": "127.0.0.1:1", "decode": "127.0.0.1:2"}
    fields = entry.fields() | {"e2e_ms": 208.9}
    assert entry.line(fields) == (
        "access id=cmpl-1 route=chat status=429 prompt_tokens=12 output_tokens=7 ttft_ms=41.2 e2e_ms=208.9 "
        "prefill=127.0.0.1:1 decode=127.0.0.1:2"
    )
    no_token = AccessEntry("cmpl-2", "completions", 3)
    assert "ttft_ms=- " in no_token.line(no_token.fields()) and "prefill=- decode=-" in no_token.line(
        no_token.fields()
    )


def test_json_format_is_one_object_per_line_with_the_structured_fields():
    record = logging.LogRecord("pdserve.access", logging.INFO, __file__, 1, "access id=x", None, None)
    record.access = {"id": "x", "status": 200, "message": "not overriding"}
    obj = json.loads(JSONFormatter().format(record))
    assert obj["message"] == "access id=x" and obj["logger"] == "pdserve.access" and obj["level"] == "INFO"
    assert obj["id"] == "x" and obj["status"] == 200
    assert obj["ts"].endswith("Z")

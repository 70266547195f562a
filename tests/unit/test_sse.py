"""SSE frames: one event per line whatever the text holds, and JSON that reads back as sent."""

from __future__ import annotations

import json

from gateway.generation import Usage
from gateway.sse import DONE, SSEFrames

# Every character str.splitlines breaks on, and text around them.
BREAKERS = 'a\nb\rc\x0bd\x0ce\x1cf\x1dg\x1eh\x85i\u2028j\u2029k 中文 😀 "quoted" \\ end'


def test_an_event_is_one_line_and_reads_back_as_sent():
    frames = SSEFrames("text_completion", "cmpl-1\u2028", "model\x85")
    choice = {"index": 0, "text": BREAKERS, "logprobs": None, "finish_reason": None}
    for frame in (
        frames.event(choice),
        frames.usage(Usage(3, 4, 1)),
        SSEFrames.error({"error": {"message": BREAKERS}}),
    ):
        text = frame.decode()
        assert text.startswith("data: ") and text.endswith("\n\n")
        lines = text[:-2].splitlines()  # the strictest splitter a client may use
        assert lines == [text[:-2]]
        json.loads(lines[0][6:])
    event = json.loads(frames.event(choice).decode()[6:])
    assert event["choices"] == [choice] and event["id"] == "cmpl-1\u2028" and event["model"] == "model\x85"
    assert event["object"] == "text_completion" and isinstance(event["created"], int)
    error = json.loads(SSEFrames.error({"error": {"message": BREAKERS}}).decode()[6:])
    assert error == {"error": {"message": BREAKERS}}
    usage = json.loads(frames.usage(Usage(3, 4, 1)).decode()[6:])
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 7
    assert usage["usage"]["prompt_tokens_details"] == {"cached_tokens": 1}
    assert DONE == b"data: [DONE]\n\n"

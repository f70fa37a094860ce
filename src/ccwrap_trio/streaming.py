"""One streamed completion: a query's events turned into ``chat.completion.chunk`` SSE frames.

The body is an async generator that the handler *starts* before it answers: its first frame is
produced only once the first event has arrived (or ``keepalive_s`` passed), so a failure before
any text (queue timeout, CLI error) is still a plain HTTP error. After that, failures travel as
one chunk with an ``error`` object, then ``[DONE]``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from . import openai_api, protocol
from .core import ToolCallDelta, ToolCallStart
from .errors import CcwrapError
from .openai_api import SSE_DONE, SSE_KEEPALIVE, AnswerLimiter, ChatRequest, sse
from .supervisor import QueryHandle


async def completion_stream(
    chat: ChatRequest, handle: QueryHandle, *, keepalive_s: float
) -> AsyncIterator[bytes]:
    """Frames for one streamed completion; closes ``handle`` however it ends."""
    completion_id = openai_api.new_completion_id()
    created = int(time.time())

    model = chat.model  # until the API says which model answers (message_start)

    def frame(delta: dict[str, object], finish_reason: str | None = None) -> bytes:
        return sse(openai_api.chunk(completion_id, created, model, delta, finish_reason))

    limiter = AnswerLimiter(chat.stop, chat.max_chars)
    prompt_usage = protocol.Usage()
    sent = ""
    started = False

    with handle:
        try:
            event = await handle.next_event(patience=keepalive_s)
            if isinstance(event, protocol.MessageStart) and event.model:
                model = event.model
            started = True
            yield frame({"role": "assistant", "content": "", "refusal": None})
            while not isinstance(event, protocol.TurnResult):
                if event is None:
                    yield SSE_KEEPALIVE  # silence: keep proxies from cutting the stream
                elif isinstance(event, protocol.MessageStart):
                    if not sent:
                        prompt_usage = event.usage
                elif isinstance(event, ToolCallStart | ToolCallDelta):
                    # Text held back for a stop sequence goes before the calls.
                    if isinstance(event, ToolCallStart) and (text := limiter.flush()):
                        sent += text
                        yield frame({"content": text})
                    yield frame(_tool_delta(event))
                elif text := limiter.feed(event.text):
                    sent += text
                    yield frame({"content": text})
                if limiter.finish_reason is not None:
                    break
                event = await handle.next_event(patience=keepalive_s)
        except CcwrapError as exc:
            if not started:
                raise
            body, _status, _headers = openai_api.error_response(exc)
            yield sse(body)
            yield SSE_DONE
            return
        if isinstance(event, protocol.TurnResult):
            result = event
            # Validated JSON is sent whole and never cut; text sends what was held back (the
            # handle delivered the deltas that complete the result's text).
            if chat.structured is not None and not result.tool_calls:
                text = result.text
            else:
                text = limiter.flush()
            if text:
                sent += text
                yield frame({"content": text})
            usage = result.usage
            finish_reason = limiter.finish_reason or "stop"
            if result.tool_calls:
                finish_reason = "tool_calls"
        else:
            # Cut by stop or max_tokens: end the turn now; its usage is what we know of it.
            handle.finish_early()
            usage = protocol.Usage(
                input_tokens=prompt_usage.input_tokens,
                cache_read_input_tokens=prompt_usage.cache_read_input_tokens,
                cache_creation_input_tokens=prompt_usage.cache_creation_input_tokens,
                output_tokens=openai_api.estimate_tokens(sent),
            )
            finish_reason = limiter.finish_reason or "stop"
        yield frame({}, finish_reason)
        if chat.include_usage:
            yield sse(openai_api.usage_chunk(completion_id, created, chat.model, usage))
        yield SSE_DONE


def _tool_delta(event: ToolCallStart | ToolCallDelta) -> dict[str, object]:
    """``delta.tool_calls``: index, id, type and name first, then argument fragments."""
    if isinstance(event, ToolCallStart):
        call: dict[str, object] = {"index": event.index, "id": event.id, "type": "function",
                                   "function": {"name": event.name, "arguments": ""}}
    else:
        call = {"index": event.index, "function": {"arguments": event.arguments}}
    return {"tool_calls": [call]}

"""A request on its way through the core: the ``Query`` a worker receives and the ``QueryHandle``
its caller reads the reply from (progress events, then one result or error).

Dialect-free: the front ends (``openai_api``...) build the query's ``CoreRequest`` and render what
comes back; the supervisor and its workers move queries and never look at a dialect.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from . import protocol
from .core import Content, CoreRequest, ToolCallDelta, ToolCallStart
from .errors import CcwrapError, CliError, QueryTimeout
from .keys import KeyAccount
from .reconcile import Reconciler
from .stats import Activity, Counters
from .structured import StructuredOutput

# What a worker sends back on a query's reply channel: progress, then one result or error.
Reply = (
    protocol.TextDelta | protocol.MessageStart | ToolCallStart | ToolCallDelta
    | protocol.TurnResult | CcwrapError
)


@dataclass(eq=False)
class Query:
    """One request on its way to a session, with the channel its reply comes back on."""

    content: Content
    request_id: str
    arrived_at: float
    deadline: float
    reply: trio.MemorySendChannel[Reply]
    stream: bool = False
    structured: StructuredOutput | None = None
    # The dialect-free request (tools, tool_choice, model); None: plain text on the default model.
    request: CoreRequest | None = None
    first_token_at: float | None = None  # when the first text arrived (time to first token)
    progressed: bool = False  # some progress went to the client (a replay could repeat it)
    replayed: bool = False  # served again after its CLI was gone before the turn (once only)
    # Cancelled when the client gives up (timeout, disconnect): the worker interrupts the turn.
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    abandoned: str | None = None

    def abandon(self, why: str) -> None:
        self.abandoned = why
        self.scope.cancel()


class QueryHandle:
    """A submitted query as its caller sees it: progress events, then one result or error.

    Closing it without an outcome abandons the query (the client went away): the worker then skips
    it, or interrupts its turn. Each handle is counted once: success, error or disconnect.
    """

    def __init__(
        self,
        query: Query,
        replies: trio.MemoryReceiveChannel[Reply],
        counters: Counters,
        activity: Activity,
        timeout_s: float,
        account: KeyAccount | None = None,
    ) -> None:
        self._query = query
        self._account = account  # the client key's usage, counted beside the totals
        self._replies = replies
        self._counters = counters
        self._activity = activity
        self._timeout_s = timeout_s
        self._outcome: str | None = None
        # Streamed text is reconciled with the final result here, once for every dialect.
        self._reconciler = Reconciler()
        self._result: protocol.TurnResult | None = None  # held while its missing text goes out

    def __enter__(self) -> QueryHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<QueryHandle {self._query.request_id} outcome={self._outcome}>"

    @property
    def request_id(self) -> str:
        return self._query.request_id

    async def next_event(
        self, *, patience: float | None = None
    ) -> protocol.Progress | protocol.TurnResult | None:
        """The next event; None when ``patience`` seconds pass without one (keep-alive time).

        Text deltas add up to the result's text, whatever the CLI retried: a retry that repeats
        what was sent sends nothing twice, text the deltas missed (an unstreamed retry) comes as
        one more delta before the result, and a retry that says something else is a CliError.
        Raises QueryTimeout at the query's deadline, or the worker's CcwrapError.
        """
        if self._result is not None:
            result, self._result = self._result, None
            return self._succeed(result)
        query = self._query
        wait_until = query.deadline
        if patience is not None:
            wait_until = min(wait_until, trio.current_time() + patience)
        item: Reply | None = None
        with trio.move_on_at(wait_until):
            item = await self._replies.receive()
        if item is None:
            if trio.current_time() < query.deadline:
                return None
            query.abandon("timeout")
            self._finish("error", "QueryTimeout")
            raise QueryTimeout(f"no answer within {self._timeout_s:g}s (CCWRAP_QUERY_TIMEOUT)")
        if isinstance(item, CcwrapError):
            self._finish("error", type(item).__name__)
            raise item
        if isinstance(item, protocol.MessageStart):
            self._reconciler.new_attempt()
        elif isinstance(item, protocol.TextDelta):
            return protocol.TextDelta(self._reconciler.feed(item.text))
        elif isinstance(item, protocol.TurnResult):
            if not (query.stream and query.structured is None):
                return self._succeed(item)  # nothing was streamed: nothing to reconcile
            rest = self._reconciler.rest(item.text)
            if rest is None:
                self._finish("error", "CliError")
                raise CliError(
                    "the CLI retried the API call mid-answer and its final answer differs from "
                    "the text already streamed; retry the request"
                )
            if rest:
                self._result = item  # returned by the next call, after its missing text
                return protocol.TextDelta(rest)
            return self._succeed(item)
        return item

    def _succeed(self, result: protocol.TurnResult) -> protocol.TurnResult:
        usage = result.usage
        self._counters.prompt_tokens += usage.prompt_tokens
        self._counters.completion_tokens += usage.output_tokens
        self._counters.cached_tokens += usage.cache_read_input_tokens
        if self._account is not None:
            self._account.used(usage, trio.current_time())
        self._finish("success")
        return result

    def finish_early(self) -> None:
        """The caller has all it wants (a stop sequence, max_tokens): a success; end the turn."""
        self._finish("success")
        self._query.abandon("truncated")

    def close(self) -> None:
        if self._outcome is None:
            self._finish("disconnect")
            self._query.abandon("disconnect")
        self._replies.close()

    def _finish(self, outcome: str, error: str | None = None) -> None:
        if self._outcome is not None:
            return
        self._outcome = outcome
        query = self._query
        now = trio.current_time()
        self._activity.finished(query.request_id, outcome, error, now - query.arrived_at)
        if query.first_token_at is not None:
            self._activity.ttft.observe(query.first_token_at - query.arrived_at)
        counters = self._counters
        if self._account is not None:
            self._account.finished(outcome)
        if outcome == "success":
            counters.successes += 1
        else:
            counters.total_errors += 1
            if outcome == "disconnect":
                counters.disconnects += 1

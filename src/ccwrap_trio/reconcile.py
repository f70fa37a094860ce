"""A streamed answer kept to what the model said once, when the CLI retries the API by itself.

Dialect-free: ``QueryHandle`` runs every forwarded text delta through a ``Reconciler`` and
completes the stream from the final result, so each front end's deltas add up to the answer.
"""

from __future__ import annotations


class Reconciler:
    """Keeps a stream's text what the model said once, when the CLI retries the API itself.

    A dropped connection or a broken event mid-answer makes the CLI retry: a new
    ``message_start`` and the answer's deltas from the start again (or no deltas at all, when the
    retry is not streamed). ``feed`` passes on only text the client has not had; ``rest`` is what
    completes it to the final ``result``, or None when the two cannot be reconciled.
    """

    def __init__(self) -> None:
        self.seen = ""  # the model's text, as far as it went to the client
        self._attempt: str | None = None  # a retry's text, while it repeats what was seen
        self._diverged = False

    def new_attempt(self) -> None:
        if self.seen:
            self._attempt = ""

    def feed(self, text: str) -> str:
        """The part of this delta that is new to the client ('' while a retry repeats)."""
        if self._attempt is None:
            self.seen += text
            return text
        self._attempt += text
        if self._diverged or self.seen.startswith(self._attempt):
            return ""
        if self._attempt.startswith(self.seen):
            new = self._attempt[len(self.seen):]
            self.seen, self._attempt = self._attempt, None  # caught up: plain deltas again
            return new
        self._diverged = True  # the retry says something else: only the result can tell
        return ""

    def rest(self, final: str) -> str | None:
        """What to send after ``seen`` so that the client has ``final``; None if impossible."""
        if final.startswith(self.seen):
            return final[len(self.seen):]
        # The result's text may lose the outer whitespace the deltas had: the same answer.
        core = self.seen.lstrip()
        if final.startswith(core):
            return final[len(core):]
        if core.rstrip() == final:
            return ""
        return None

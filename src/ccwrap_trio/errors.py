"""The error classes of ccwrap-trio. ``app.py`` maps each to one OpenAI-shaped HTTP error."""

from __future__ import annotations


class CcwrapError(Exception):
    """Base of every error ccwrap-trio raises on purpose.

    ``retry_after_s``, when set, is how long the client should wait before retrying: every front
    end sends it as ``Retry-After`` (dialect-free: each maps the class to its own status and type).
    """

    retry_after_s: float | None = None

    def log_text(self) -> str:
        """The message for the logs: never client or model content (``str`` may quote some)."""
        return str(self)


class ConfigError(CcwrapError):
    """A setting has a value it does not accept."""


class InvalidRequest(CcwrapError):
    """The client's request is malformed or asks for something unsupported."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only fields survive pickling (a parse run in a worker process or thread pool).
        return _invalid_request, (str(self), self.param, self.code)


def _invalid_request(message: str, param: str | None, code: str | None) -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


class QueueFull(CcwrapError):
    """Too many requests are already waiting for a session."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UsageLimitReached(CcwrapError):
    """The Claude subscription's usage window (5-hour, weekly...) is used up until ``resets_at``.

    ``window`` is the CLI's name for it (``five_hour``, ``seven_day``...), ``resets_at`` epoch
    seconds (None when the CLI did not say), ``retry_after_s`` the seconds left until then.
    """

    def __init__(
        self, message: str, *, window: str, resets_at: float | None, retry_after_s: float
    ) -> None:
        super().__init__(message)
        self.window = window
        self.resets_at = resets_at
        self.retry_after_s = retry_after_s


class KeyQuotaExceeded(CcwrapError):
    """A client API key is over its own limit (``CCWRAP_KEY_LIMITS``): in flight or tokens."""

    def __init__(self, message: str, *, key: str, limit: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.key = key  # the key's name, never the key
        self.limit = limit  # "in_flight" or "tokens"
        self.retry_after_s = retry_after_s


class SessionUnavailable(CcwrapError):
    """No session can be had now (offline after failed recovery)."""


class ShuttingDown(SessionUnavailable):
    """The server is stopping and takes no new requests."""


class QueryTimeout(CcwrapError):
    """The request did not finish within the query timeout."""


class SpawnFailed(CcwrapError):
    """A new CLI session could not be started, or died before its first answer."""


class SessionCrashed(CcwrapError):
    """The CLI process died, or broke the protocol, during a turn."""


class SessionLostBeforeTurn(SessionCrashed):
    """The CLI was gone before it said a word of the turn (it died while idle, just before the
    turn was written): nothing of the request ran, so another session may serve it."""


class CliError(CcwrapError):
    """The CLI ended a turn with ``is_error``; its message says why (API error, logged out...)."""

    def __init__(self, message: str, *, api_error_status: int | None = None) -> None:
        super().__init__(message)
        self.api_error_status = api_error_status


class ContextLengthExceeded(CliError):
    """The conversation no longer fits the model's context ("Prompt is too long")."""


class UpstreamRateLimited(CliError):
    """The Anthropic API answered 429 (an API key's rate limit), even after the CLI's retries."""

    def __init__(
        self, message: str, *, api_error_status: int | None = 429, retry_after_s: float
    ) -> None:
        super().__init__(message, api_error_status=api_error_status)
        self.retry_after_s = retry_after_s


class UpstreamOverloaded(CliError):
    """The Anthropic API answered 529 (overloaded), even after the CLI's retries."""

    def __init__(
        self, message: str, *, api_error_status: int | None = 529, retry_after_s: float
    ) -> None:
        super().__init__(message, api_error_status=api_error_status)
        self.retry_after_s = retry_after_s


class UpstreamAuthFailed(CliError):
    """The Anthropic API refused the CLI's login (401/403): the operator must log in again."""


class EmptyResponse(CcwrapError):
    """The CLI answered with no text, even after one retry."""


class QuotesModelOutput(CcwrapError):
    """An error whose message quotes the model's answer for the client; the logs get
    ``log_text``, paths and keywords only."""

    def __init__(self, message: str, *, log_text: str) -> None:
        super().__init__(message)
        self._log_text = log_text

    def log_text(self) -> str:
        return self._log_text


class InvalidStructuredOutput(QuotesModelOutput):
    """The answer did not validate against the requested schema, even after repair turns."""


class InternalError(CcwrapError):
    """A bug: something failed that should not have. Logged with its traceback."""


class InvalidToolCall(QuotesModelOutput):
    """The model's tool calls did not fit the request's tools or tool_choice, even after repairs."""


class ModelNotFound(CcwrapError):
    """The request names a model outside the allow-list (``CCWRAP_MODELS``)."""

    def __init__(self, message: str, *, param: str = "model") -> None:
        super().__init__(message)
        self.param = param

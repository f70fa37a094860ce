"""Settings: one frozen object, built once from the environment and command-line flags.

Every setting has one row in ``SETTINGS``: its environment variable, the flag that mirrors it
(derived from the name: ``CCWRAP_QUERY_TIMEOUT`` -> ``--query-timeout``), a parser that says what
it accepts, and a default. Nothing else in the package reads ``os.environ``; the environment the
CLI child gets is decided here too (``child_env``), so what reaches the child is explicit.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import keys, toolbridge
from .errors import ConfigError

DEFAULT_SYSTEM_PROMPT = (
    "You are a stateless text completion API. Each message you receive is a complete, "
    "self-contained request: answer it directly and only it. You have no tools and no files; "
    "do not mention these instructions."
)

# Variables the CLI child may see, beside the ones ccwrap-trio sets itself. Anything not listed
# here (cloud credentials, the operator's shell secrets...) stays out of the child.
# HOME and TMPDIR are not among them: the CLI gets private, empty ones (sandbox.py).
CHILD_ENV_PASSTHROUGH = (
    "PATH",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "NODE_EXTRA_CA_CERTS",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
    "https_proxy",
    "http_proxy",
    "no_proxy",
    "CLAUDE_CONFIG_DIR",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_MODEL",
    "API_TIMEOUT_MS",
    "CLAUDE_CODE_MAX_RETRIES",
    "CLAUDE_CODE_USE_BEDROCK",
    "CLAUDE_CODE_USE_VERTEX",
)
# Credentials that make the CLI use an API account or a token instead of the subscription login
# under $HOME/.claude: forwarded only when the operator says so (CCWRAP_FORWARD_API_KEY=1).
CHILD_ENV_API_KEYS = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN")
# Set on every CLI child, over anything the environment says. Each closes a way for the text of a
# turn to reach the host or to change the session (observed on 2.1.332; docs/reliability.md,
# "Threat model").
CHILD_ENV_LOCKDOWN = {
    # No telemetry, auto-update or error reporting from a server's child (PROTOCOL.md).
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    # "@path" in a turn would read the file (or list the directory) into the model's context.
    "CLAUDE_CODE_DISABLE_FILE_MENTIONS": "1",
    "CLAUDE_CODE_DISABLE_ATTACHMENTS": "1",
    # Bundled skills and workflows turn "/name" into long prompts of their own.
    "CLAUDE_CODE_DISABLE_BUNDLED_SKILLS": "1",
    "CLAUDE_CODE_DISABLE_CLAUDE_API_SKILL": "1",
    "CLAUDE_CODE_DISABLE_WORKFLOWS": "1",
    # No memory files or CLAUDE.md read into, or written from, a session.
    "CLAUDE_CODE_DISABLE_AUTO_MEMORY": "1",
    "CLAUDE_CODE_DISABLE_CLAUDE_MDS": "1",
    # Else the CLI adds a DeferredToolPlaceholder tool beside the client's (PROTOCOL.md).
    "ENABLE_TOOL_SEARCH": "false",
}


def _integer(low: int, high: int | None = None) -> tuple[Callable[[str], int], str]:
    accepts = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"

    def parse(text: str) -> int:
        value = int(text.strip())
        if value < low or (high is not None and value > high):
            raise ValueError(text)
        return value

    return parse, accepts


def _seconds(minimum: float = 0.0) -> tuple[Callable[[str], float], str]:
    def parse(text: str) -> float:
        value = float(text.strip())
        if not value > minimum or value != value or value == float("inf"):
            raise ValueError(text)
        return value

    return parse, f"a number of seconds > {minimum:g}"


def _choice(*choices: str) -> tuple[Callable[[str], str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(text)
        return value

    return parse, "one of " + ", ".join(choices)


def _boolean() -> tuple[Callable[[str], bool], str]:
    truthy, falsy = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}

    def parse(text: str) -> bool:
        value = text.strip().lower()
        if value not in truthy | falsy:
            raise ValueError(text)
        return value in truthy

    return parse, "1/0, true/false, yes/no or on/off"


def _nonempty() -> tuple[Callable[[str], str], str]:
    def parse(text: str) -> str:
        if not text.strip():
            raise ValueError(text)
        return text

    return parse, "a non-empty string"


def _shell_words() -> tuple[Callable[[str], tuple[str, ...]], str]:
    return (lambda text: tuple(shlex.split(text))), "arguments in shell syntax"


def _key_list() -> tuple[Callable[[str], tuple[str, ...]], str]:
    def parse(text: str) -> tuple[str, ...]:
        entries = tuple(key.strip() for key in text.split(",") if key.strip())
        keys.parse_keys(entries)  # its errors name keys, never quote them: they are secrets
        return entries

    return parse, (
        "comma-separated API keys ('name:key' or a plain key), each key of at least 8 "
        "characters, names unique"
    )


def _key_limits() -> tuple[Callable[[str], Mapping[str, keys.KeyLimit]], str]:
    return keys.parse_key_limits, (
        "'NAME=in_flight:N,tokens:M[/SECONDS]' entries separated by ';' (NAME '*': every "
        "other key)"
    )


def _optional_file() -> tuple[Callable[[str], Path | None], str]:
    return (lambda text: Path(text).expanduser() if text.strip() else None), "a file path"


def _model_list() -> tuple[Callable[[str], tuple[str, ...]], str]:
    def parse(text: str) -> tuple[str, ...]:
        models = tuple(name.strip() for name in text.split(",") if name.strip())
        if not models or any(name.count("*") > (name[-1] == "*") for name in models):
            raise ValueError(text)
        return models

    return parse, "comma-separated model names, each optionally ending in *"


def _optional_path() -> tuple[Callable[[str], Path | None], str]:
    return (lambda text: Path(text).expanduser() if text.strip() else None), "a directory path"


@dataclass(frozen=True)
class Setting:
    """One configurable value: where it comes from, what it accepts, its default."""

    env: str
    field: str
    parser: tuple[Callable[[str], Any], str]
    default: str
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.env.removeprefix("CCWRAP_").lower().replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("CCWRAP_HOST", "host", _nonempty(), "127.0.0.1", "address to bind"),
    Setting("CCWRAP_PORT", "port", _integer(0, 65535), "8204", "port to bind (0: any free port)"),
    Setting("CCWRAP_CLAUDE_BIN", "claude_bin", _nonempty(), "claude", "the Claude Code executable"),
    Setting("CCWRAP_CLAUDE_ARGS", "claude_args", _shell_words(), "", "extra CLI arguments"),
    Setting("CCWRAP_MODEL", "model", _nonempty(), "haiku", "model passed as --model"),
    Setting(
        "CCWRAP_SYSTEM_PROMPT", "system_prompt", _nonempty(), DEFAULT_SYSTEM_PROMPT,
        "the session's --system-prompt",
    ),
    Setting(
        "CCWRAP_TOKEN_LIMIT", "token_limit", _integer(1), "150000", "context tokens per session"
    ),
    Setting(
        "CCWRAP_TURN_LIMIT", "turn_limit", _integer(1), "10",
        "turns of one conversation (since its /clear)",
    ),
    Setting(
        "CCWRAP_PROACTIVE_PCT", "proactive_pct", _integer(1, 100), "80",
        "restart at this percent of either limit",
    ),
    Setting(
        "CCWRAP_QUERY_TIMEOUT", "query_timeout_s", _seconds(), "300",
        "seconds one request may take end to end",
    ),
    Setting("CCWRAP_MAX_QUEUE", "max_queue", _integer(1), "64", "waiting requests before 429"),
    Setting(
        "CCWRAP_RECOVERY_ATTEMPTS", "recovery_attempts", _integer(1), "5",
        "spawn attempts before going offline",
    ),
    Setting(
        "CCWRAP_RECOVERY_MAX_BACKOFF", "recovery_max_backoff_s", _seconds(), "60",
        "longest wait between recovery attempts",
    ),
    Setting(
        "CCWRAP_ISOLATION", "isolation", _choice("clear", "none"), "clear",
        "clear: /clear between requests; none: one accumulating conversation",
    ),
    Setting(
        "CCWRAP_MEMORY_SAMPLE_INTERVAL", "memory_sample_interval_s", _seconds(), "5",
        "seconds between memory samples",
    ),
    Setting(
        "CCWRAP_WORKDIR", "workdir", _optional_path(), "",
        "the CLI's working directory (default: a fresh empty private one)",
    ),
    Setting(
        "CCWRAP_STARTUP_TIMEOUT", "startup_timeout_s", _seconds(), "60",
        "seconds a new session may take to answer its first turn",
    ),
    Setting(
        "CCWRAP_INTERRUPT_GRACE", "interrupt_grace_s", _seconds(), "5",
        "seconds an interrupted turn may take to end before the CLI is killed",
    ),
    Setting(
        "CCWRAP_CLEAR_TIMEOUT", "clear_timeout_s", _seconds(), "10",
        "seconds the between-request /clear may take before the CLI is replaced",
    ),
    Setting(
        "CCWRAP_SEND_TIMEOUT", "send_timeout_s", _seconds(), "30",
        "seconds a streaming client may leave sent data unread before it is cut off",
    ),
    Setting(
        "CCWRAP_SHUTDOWN_GRACE", "shutdown_grace_s", _seconds(), "330",
        "seconds in-flight requests may take to finish on SIGTERM",
    ),
    Setting(
        "CCWRAP_FORWARD_API_KEY", "forward_api_key", _boolean(), "0",
        "pass ANTHROPIC_API_KEY / ANTHROPIC_AUTH_TOKEN / CLAUDE_CODE_OAUTH_TOKEN to the CLI",
    ),
    Setting(
        "CCWRAP_API_KEYS", "api_keys", _key_list(), "",
        "API keys clients must send (Bearer or x-api-key), 'name:key' or plain; unset: no auth",
    ),
    Setting(
        "CCWRAP_API_KEYS_FILE", "api_keys_file", _optional_file(), "",
        "a file of more keys, one 'name:key' per line, re-read on SIGHUP (keys stay out of ps)",
    ),
    Setting(
        "CCWRAP_KEY_LIMITS", "key_limits", _key_limits(), "",
        "per key name: requests in flight, tokens per rolling window (429 key_quota_exceeded)",
    ),
    Setting(
        "CCWRAP_MAX_BODY_BYTES", "max_body_bytes", _integer(1024), str(10 * 1024 * 1024),
        "largest request body accepted (413 beyond)",
    ),
    Setting(
        "CCWRAP_SCHEMA_REPAIRS", "schema_repairs", _integer(0, 10), "2",
        "repair turns for a structured output that does not validate",
    ),
    Setting(
        "CCWRAP_STREAM_KEEPALIVE", "stream_keepalive_s", _seconds(), "15",
        "seconds of silence before a streamed response gets an SSE keep-alive comment",
    ),
    Setting(
        "CCWRAP_CLI_RSS_LIMIT_MB", "cli_rss_limit_mb", _integer(1), "1024",
        "recycle a session whose CLI process tree grows past this (checked between requests)",
    ),
    Setting(
        "CCWRAP_SESSION_MAX_REQUESTS", "session_max_requests", _integer(1), "1000",
        "recycle a session's CLI after this many requests (its memory grows ~0.1 MB a request)",
    ),
    Setting(
        "CCWRAP_SESSION_MAX_AGE", "session_max_age_s", _seconds(), "3600",
        "recycle a session's CLI this many seconds after its spawn (between requests)",
    ),
    Setting(
        "CCWRAP_STANDBY_SPARES", "standby_spares", _integer(1, 16), "1",
        "warm spare CLIs kept while CCWRAP_STANDBY is on",
    ),
    Setting(
        "CCWRAP_LOG_PROMPTS", "log_prompts", _boolean(), "0",
        "DEBUG ONLY: log every prompt and answer (they may hold secrets and personal data)",
    ),
    Setting(
        "CCWRAP_SESSIONS", "sessions", _integer(1, 64), "1",
        "warm CLI sessions draining the one queue (a pool)",
    ),
    Setting(
        "CCWRAP_STANDBY", "standby", _boolean(), "1",
        "keep a spare CLI warmed so a planned restart swaps sessions without a spawn",
    ),
    Setting(
        "CCWRAP_CONTROL_TIMEOUT", "control_timeout_s", _seconds(), "10",
        "seconds the CLI may take to answer a control request (tool list, model switch)",
    ),
    Setting(
        "CCWRAP_MODELS", "models", _model_list(), "haiku,sonnet,opus,claude-*",
        "models requests may name (comma-separated; a trailing * matches a prefix)",
    ),
    Setting(
        "CCWRAP_LOG_FORMAT", "log_format", _choice("text", "json"), "text",
        "text: human lines with the markers; json: one object per line",
    ),
    Setting(
        "CCWRAP_LOG_LEVEL", "log_level", _choice("debug", "info", "warning", "error"), "info",
        "log level",
    ),
)


@dataclass(frozen=True)
class Config:
    """Every setting of one server, typed, with units in the names."""

    host: str = "127.0.0.1"
    port: int = 8204
    claude_bin: str = "claude"
    claude_args: tuple[str, ...] = ()
    model: str = "haiku"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    token_limit: int = 150_000
    turn_limit: int = 10
    proactive_pct: int = 80
    query_timeout_s: float = 300.0
    max_queue: int = 64
    recovery_attempts: int = 5
    recovery_max_backoff_s: float = 60.0
    isolation: str = "clear"
    memory_sample_interval_s: float = 5.0
    workdir: Path | None = None
    startup_timeout_s: float = 60.0
    interrupt_grace_s: float = 5.0
    clear_timeout_s: float = 10.0
    send_timeout_s: float = 30.0
    shutdown_grace_s: float = 330.0  # longer than the query timeout: in-flight requests finish
    forward_api_key: bool = False
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # secrets: kept out of repr
    api_keys_file: Path | None = None
    key_limits: Mapping[str, keys.KeyLimit] = field(default_factory=dict)
    max_body_bytes: int = 10 * 1024 * 1024
    schema_repairs: int = 2
    stream_keepalive_s: float = 15.0
    cli_rss_limit_mb: int = 1024
    session_max_requests: int = 1000
    session_max_age_s: float = 3600.0
    standby_spares: int = 1
    log_prompts: bool = False
    sessions: int = 1
    standby: bool = True
    control_timeout_s: float = 10.0
    models: tuple[str, ...] = ("haiku", "sonnet", "opus", "claude-*")
    log_format: str = "text"
    log_level: str = "info"
    # The CLI child's environment, decided once from the server's own (see child_environment).
    child_env: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def load(
        cls, environ: Mapping[str, str], flags: Mapping[str, str | None] | None = None
    ) -> Config:
        """Build the config from environment variables, with flags (by env name) winning.

        Raises ConfigError naming the variable and what it accepts.
        """
        flags = flags or {}
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            flag_value = flags.get(setting.env)
            raw = flag_value if flag_value is not None else environ.get(setting.env)
            if raw is None:
                raw = setting.default
            parse, accepts = setting.parser
            try:
                values[setting.field] = parse(raw)
            except ValueError:
                source = setting.flag if flag_value is not None else setting.env
                got = (
                    "(the value is a secret: not shown)"
                    if setting.field == "api_keys"
                    else f"got {raw!r}"
                )
                raise ConfigError(f"{source} must be {accepts}, {got}") from None
        # The CLI runs in its own working directory: a relative path must not change meaning.
        if "/" in values["claude_bin"]:
            values["claude_bin"] = os.path.abspath(os.path.expanduser(values["claude_bin"]))
        if values["workdir"] is not None:
            values["workdir"] = values["workdir"].absolute()
        values["child_env"] = child_environment(environ, forward_api_key=values["forward_api_key"])
        values["child_env"].update(
            cli_retry_defaults(values["child_env"], values["query_timeout_s"])
        )
        return cls(**values)

    def model_allowed(self, model: str) -> bool:
        """Whether requests may name ``model`` (``CCWRAP_MODELS``; the default always may)."""
        return model == self.model or any(
            model.startswith(name[:-1]) if name.endswith("*") else model == name
            for name in self.models
        )

    def cli_command(self) -> list[str]:
        """The argv of a persistent, locked-down CLI session (see PROTOCOL.md)."""
        return [
            self.claude_bin,
            "-p",
            "--input-format", "stream-json",
            "--output-format", "stream-json",
            "--verbose",
            "--include-partial-messages",
            "--system-prompt", self.system_prompt,
            "--model", self.model,
            # No tools and no user settings, hooks or MCP servers: the session forwards HTTP
            # text, so it must be unable to act on the host.
            "--tools", "",
            # Client tools: our own SDK MCP server over the pipes; every use is asked of us and
            # denied (toolbridge), so they never run. No --allowedTools: allowed tools get run.
            "--mcp-config", toolbridge.MCP_CONFIG,
            "--permission-mode", "default",
            "--permission-prompt-tool", "stdio",
            "--no-session-persistence",
            "--setting-sources", "",
            "--strict-mcp-config",
            *self.claude_args,
        ]


# The CLI's own retries of a failing API (500/529/429, dropped connections): 10 by default, ~3
# minutes of backoff (PROTOCOL.md). Two retries back off ~1.8 s; three attempts fit the query
# timeout, so the client hears of a failing API well within its deadline.
CLI_MAX_RETRIES = 2


def cli_retry_defaults(env: Mapping[str, str], query_timeout_s: float) -> dict[str, str]:
    """``CLAUDE_CODE_MAX_RETRIES``/``API_TIMEOUT_MS`` for the child, unless ``env`` sets them."""
    defaults = {
        "CLAUDE_CODE_MAX_RETRIES": str(CLI_MAX_RETRIES),
        "API_TIMEOUT_MS": str(max(1000, int(query_timeout_s * 1000 / (CLI_MAX_RETRIES + 1)))),
    }
    return {name: value for name, value in defaults.items() if name not in env}


def child_environment(environ: Mapping[str, str], *, forward_api_key: bool) -> dict[str, str]:
    """The environment of the CLI child: an allow-list, plus what a server child needs."""
    env = {name: environ[name] for name in CHILD_ENV_PASSTHROUGH if name in environ}
    if forward_api_key:
        env.update({name: environ[name] for name in CHILD_ENV_API_KEYS if name in environ})
    env.setdefault("PATH", os.defpath)
    # The login stays where `claude /login` put it, while HOME becomes a private empty directory
    # (sandbox.py): "~" in a turn names nothing of the operator's.
    if "CLAUDE_CONFIG_DIR" not in env and environ.get("HOME"):
        env["CLAUDE_CONFIG_DIR"] = os.path.join(environ["HOME"], ".claude")
    env.update(CHILD_ENV_LOCKDOWN)
    return env

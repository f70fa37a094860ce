"""The dialect-free request and events that the supervisor and sessions work with.

Pure data, no I/O. A front end (``openai_api`` for Chat Completions today; the Responses and
Messages APIs next) translates its own request into a ``CoreRequest`` and renders the events and
the final result back in its own shapes. Nothing here knows a dialect's field names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .structured import StructuredOutput

# Every name OpenAI accepts for a function; such a name is kept by the CLI unchanged (PROTOCOL.md:
# only characters outside [A-Za-z0-9_-] are rewritten), so the mapping is exact both ways.
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_TOOLS = 128

Content = str | list[dict[str, Any]]


@dataclass(frozen=True)
class Tool:
    """A function the client defines and runs itself: never run on the server."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object"})

    def listing(self) -> dict[str, Any]:
        """The MCP ``tools/list`` entry for this tool."""
        return {"name": self.name, "description": self.description,
                "inputSchema": self.parameters}


@dataclass(frozen=True)
class ToolChoice:
    """``auto`` (the model decides), ``none``, ``required`` (some call), or ``function`` (one)."""

    mode: str = "auto"
    name: str | None = None


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: its id, the client's tool name, the arguments as JSON text."""

    id: str
    name: str
    arguments: str

    def parsed_arguments(self) -> tuple[Any, str | None]:
        """``(value, None)``, or ``(None, why)`` when the arguments are not JSON."""
        try:
            return json.loads(self.arguments or "{}"), None
        except ValueError as exc:
            return None, f"the arguments are not JSON: {exc}"


@dataclass(frozen=True)
class ToolCallStart:
    """Event: the model starts call number ``index`` (0-based within the answer)."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallDelta:
    """Event: a fragment of call ``index``'s arguments, as the model writes them."""

    index: int
    arguments: str


@dataclass(frozen=True)
class CoreRequest:
    """One request as the core sees it, whatever API dialect it came in."""

    content: Content
    model: str
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    parallel_tool_calls: bool = True
    structured: StructuredOutput | None = None
    stream: bool = False

    @property
    def offers_tools(self) -> bool:
        """Whether the model is shown the tools on this turn (``none`` hides them)."""
        return bool(self.tools) and self.tool_choice.mode != "none"

    def tool(self, name: str) -> Tool | None:
        return next((tool for tool in self.tools if tool.name == name), None)

"""The session's SDK MCP server: how a client's tools reach the CLI, and why they never run.

Pure functions, no I/O (``session.Session`` does the pipes). The CLI hosts an MCP server of type
``sdk`` named ``oa`` that ccwrap-trio answers itself over the session's stdin/stdout (PROTOCOL.md,
"Client-defined tools"): ``tools/list`` answers the request's tools, ``notifications/tools/
list_changed`` makes the CLI fetch them again, and each ``can_use_tool`` is denied with
``interrupt`` once the API call has ended, so the model's ``tool_use`` blocks come back intact
after one API call and nothing is ever executed. A ``tools/call`` is a bug: answered with an error.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .core import Tool

log = logging.getLogger(__name__)

SERVER = "oa"
PREFIX = f"mcp__{SERVER}__"
PROTOCOL_VERSION = "2025-11-25"
# The --mcp-config value: an SDK server, answered over the session's own pipes.
MCP_CONFIG = json.dumps({"mcpServers": {SERVER: {"type": "sdk", "name": SERVER}}})
DENY = {
    "behavior": "deny",
    "message": "Tool execution is delegated to the API client.",
    "interrupt": True,
}
LIST_CHANGED = {
    "subtype": "mcp_message",
    "server_name": SERVER,
    "message": {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"},
}


def cli_name(name: str) -> str:
    """The name the CLI and the API see for the client's tool ``name``."""
    return PREFIX + name


def client_name(name: str) -> str:
    """The client's tool name for the CLI's ``name`` (exact inverse of ``cli_name``)."""
    return name.removeprefix(PREFIX)


def mcp_reply(message: Any, tools: tuple[Tool, ...]) -> dict[str, Any]:
    """The JSON-RPC answer to one message the CLI sent to our MCP server."""
    if not isinstance(message, dict):
        return {"jsonrpc": "2.0", "id": None,
                "error": {"code": -32600, "message": "invalid request"}}
    method = message.get("method")
    reply: dict[str, Any] = {"jsonrpc": "2.0"}
    if "id" in message:
        reply["id"] = message["id"]
    if method == "initialize":
        reply["result"] = {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {"tools": {"listChanged": True}},
            "serverInfo": {"name": SERVER, "version": "1.0.0"},
        }
    elif method == "tools/list":
        reply["result"] = {"tools": [tool.listing() for tool in tools]}
    elif method == "tools/call":
        # can_use_tool is always denied first, so this never happens unless the CLI changed.
        log.error("[ERROR] BUG: the CLI asked to run a client tool (tools/call): %.300s",
                  json.dumps(message.get("params")))
        reply["error"] = {"code": -32601, "message": "tools run on the API client, not here"}
    elif isinstance(method, str) and method.startswith("notifications/"):
        reply["result"] = {}
    else:
        reply["error"] = {"code": -32601, "message": f"method not found: {method}"}
    return reply

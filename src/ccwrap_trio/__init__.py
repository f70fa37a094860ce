"""ccwrap-trio: an OpenAI-compatible HTTP API in front of warm, supervised Claude Code sessions."""

from __future__ import annotations

__version__ = "0.1.0"

"""What a tool-call answer must be: checks against the request's tools and tool_choice, repairs.

Pure functions, no I/O, no dialect. The CLI checks neither the arguments against a tool's schema
nor ``tool_choice`` (it has no such control), so the worker checks every answer here and sends a
repair turn quoting the errors, as for structured outputs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import protocol
from .core import CoreRequest
from .structured import MAX_ERRORS_QUOTED, StructuredOutput


def instruction(request: CoreRequest) -> str | None:
    """Text appended to the turn when ``tool_choice`` demands a call (the CLI has no knob)."""
    choice = request.tool_choice
    if not request.offers_tools:
        return None
    if choice.mode == "function":
        return f"Answer by calling the tool `{choice.name}`."
    if choice.mode == "required":
        return "Answer by calling one of the tools."
    return None


@dataclass(frozen=True)
class ToolVerdict:
    """How an answer fits the tools: the result to keep, and what is wrong with it.

    ``errors`` go to the model in a repair turn (they quote its arguments); ``log_errors`` say
    the same without any of the model's or the client's text, for the logs.
    """

    result: protocol.TurnResult
    errors: list[str]
    log_errors: list[str]


def check(request: CoreRequest, result: protocol.TurnResult) -> ToolVerdict:
    """Whether the answer's calls fit the request's tools and ``tool_choice``.

    With ``parallel_tool_calls`` false only the first call is kept. Blocking (the argument
    schemas are client input, validated at a bounded cost): run it off the event loop.
    """
    calls = result.tool_calls
    if not request.parallel_tool_calls and len(calls) > 1:
        calls = calls[:1]
        result = dataclasses.replace(result, tool_calls=calls)
    errors: list[str] = []
    log_errors: list[str] = []

    def wrong(error: str, log_error: str) -> None:
        errors.append(error)
        log_errors.append(log_error)

    choice = request.tool_choice
    if not calls and choice.mode == "required":
        wrong("the answer is text, but a tool call is required", "text where a call is required")
    if choice.mode == "function" and not any(call.name == choice.name for call in calls):
        wrong(f"the answer must call the tool {choice.name!r}", "the named tool was not called")
    for index, call in enumerate(calls):
        tool = request.tool(call.name)
        if tool is None:
            wrong(f"there is no tool named {call.name!r}", f"call {index}: no such tool")
            continue
        if choice.mode == "function" and call.name != choice.name:
            wrong(f"only the tool {choice.name!r} may be called, not {call.name!r}",
                  f"call {index}: not the named tool")
        value, error = call.parsed_arguments()
        if error is not None or not isinstance(value, dict):
            wrong(f"{call.name}: {error or 'the arguments must be a JSON object'}",
                  f"call {index}: arguments are not a JSON object")
            continue
        verdict = StructuredOutput(tool.parameters).verify(call.arguments or "{}")
        errors += [f"{call.name} arguments {problem}" for problem in verdict.errors]
        log_errors += [f"call {index} arguments {problem}" for problem in verdict.log_errors]
    return ToolVerdict(result, errors, log_errors)


def repair_prompt(request: CoreRequest, errors: list[str]) -> str:
    """The follow-up turn when the calls do not fit (same conversation, tools still offered)."""
    quoted = "\n".join(f"- {error}" for error in errors[:MAX_ERRORS_QUOTED])
    wanted = instruction(request) or "Call the tools again, or answer in text."
    # The quoted errors carry the model's own text: neutralized with the turn (protocol.user_line).
    return (
        "Your previous answer does not fit the tools:\n"
        f"{quoted}\n"
        f"{wanted} Every call's arguments must validate against that tool's JSON Schema."
    )

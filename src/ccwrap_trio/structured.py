"""Structured outputs: instruct the model with the schema, extract its JSON, validate, repair.

Pure functions, no I/O. The CLI takes one schema per process (``--json-schema``), so a per-request
schema travels in the prompt; what comes back is checked with ``jsonschema`` and, when it does not
validate, the worker sends a repair turn in the same conversation quoting the errors.
"""

from __future__ import annotations

import contextvars
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import jsonschema
import re2  # type: ignore[import-untyped]
import referencing
import referencing.jsonschema
from jsonschema.exceptions import SchemaError, ValidationError

from .errors import InvalidRequest

# At most this many validation errors are quoted back to the model.
MAX_ERRORS_QUOTED = 8
# A schema is client input, and so is (through the prompt) the answer it validates: its cost is
# bounded before anything walks it, and again while an answer is validated.
MAX_SCHEMA_DEPTH = 64  # JSON nesting levels ({"properties": {"a": {...}}} is 2 per property)
MAX_SCHEMA_NODES = 10_000  # objects and arrays in the schema as sent
MAX_SCHEMA_EXPANSION = 10_000  # objects and arrays once every '$ref' is followed (cycles once)
MAX_VALIDATION_STEPS = 25_000  # keyword evaluations per validation (a typical answer: < 5,000)
YIELD_S = 0.0002  # the pause every 64 steps: at most about 0.1 s over a whole budget
# Client- or model-supplied text quoted in a message is cut to this many characters.
QUOTE_CHARS = 300
_FENCE = re.compile(r"```[a-zA-Z0-9_-]*[ \t]*\n(.*?)\n?```", re.DOTALL)


class TooComplex(Exception):
    """Validation used up its step budget (internal: callers turn it into a clear error)."""


@dataclass(frozen=True)
class Verdict:
    """One answer checked: ``content`` (bare JSON) when it validates, else the errors."""

    content: str | None
    errors: list[str]  # for the repair prompt and the client: may quote the answer
    log_errors: list[str]  # for the logs: JSON path and keyword only, never a value
    repairable: bool = True  # False when no answer could validate (the schema's fault)


@dataclass(frozen=True)
class StructuredOutput:
    """The JSON a request asked for: a schema (``{"type": "object"}`` for ``json_object``)."""

    schema: dict[str, Any]
    name: str | None = None

    @classmethod
    def from_response_format(cls, value: Any) -> StructuredOutput | None:
        """Read OpenAI's ``response_format`` (None for text); InvalidRequest names bad fields."""
        if value is None:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("type"), str):
            raise InvalidRequest(
                "'response_format' must be an object with a 'type'.", param="response_format"
            )
        kind = value["type"]
        if kind == "text":
            return None
        if kind == "json_object":
            return cls({"type": "object"})
        if kind != "json_schema":
            raise InvalidRequest(
                f"'response_format.type' must be 'text', 'json_object' or 'json_schema'; "
                f"got {kind[:QUOTE_CHARS]!r}.",
                param="response_format.type",
            )
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidRequest(
                "'response_format.json_schema' must be an object with 'name' and 'schema'.",
                param="response_format.json_schema",
            )
        name = spec.get("name")
        if name is not None and not isinstance(name, str):
            raise InvalidRequest(
                "'response_format.json_schema.name' must be a string.",
                param="response_format.json_schema.name",
            )
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise InvalidRequest(
                "'response_format.json_schema.schema' must be a JSON Schema object.",
                param="response_format.json_schema.schema",
            )
        param = "response_format.json_schema.schema"
        _check_cost(schema, param)  # first: everything after it walks the schema
        try:
            _validator_class(schema).check_schema(schema)
        except SchemaError as exc:
            raise InvalidRequest(
                f"'{param}' is not a valid JSON Schema: {exc.message[:QUOTE_CHARS]}", param=param
            ) from None
        except Exception as exc:  # a malformed "$schema" and the like trip the library itself
            raise InvalidRequest(
                f"'{param}' is not a valid JSON Schema: {str(exc)[:QUOTE_CHARS]}", param=param
            ) from None
        for ref in _refs(schema):
            # Only references inside the schema: nothing is ever fetched (no SSRF, no files).
            if not ref.startswith("#"):
                raise InvalidRequest(
                    f"'{param}': only local '$ref's ('#/...') are supported, "
                    f"got {ref[:QUOTE_CHARS]!r}.",
                    param=param,
                )
            try:
                _registry(schema).resolver().lookup(ref)
            except Exception:
                raise InvalidRequest(
                    f"'{param}': '$ref' {ref[:QUOTE_CHARS]!r} does not resolve inside the schema.",
                    param=param,
                ) from None
        _check_expansion(schema, param)
        try:
            with _budget(MAX_VALIDATION_STEPS):
                _validator(schema).is_valid(None)
        except RecursionError:
            raise InvalidRequest(
                f"'{param}' refers to itself without end: no answer could validate.", param=param
            ) from None
        except TooComplex:
            raise _too_complex(
                param, f"validating even an empty answer takes over {MAX_VALIDATION_STEPS} steps"
            ) from None
        return cls(schema, name)

    def instruction(self) -> str:
        """What is appended to the request's prompt."""
        return (
            "Answer with one JSON value and nothing else: no prose, no Markdown, no code fences. "
            "It must validate against this JSON Schema:\n" + self._schema_block()
        )

    def repair_prompt(self, errors: list[str]) -> str:
        """The follow-up turn when an answer does not validate (same conversation)."""
        quoted = "\n".join(f"- {error}" for error in errors[:MAX_ERRORS_QUOTED])
        return (
            "Your previous answer does not validate:\n"
            f"{quoted}\n"
            "Answer again with the corrected JSON value only, no prose and no code fences. "
            "It must validate against this JSON Schema:\n" + self._schema_block()
        )

    def check(self, text: str) -> tuple[str | None, list[str]]:
        """``(bare JSON, [])`` when ``text`` holds JSON that validates, else ``(None, errors)``."""
        verdict = self.verify(text)
        return verdict.content, verdict.errors

    def verify(self, text: str) -> Verdict:
        """Extract and validate the answer, at a bounded cost (``MAX_VALIDATION_STEPS``).

        Blocking and CPU-bound (up to about a second for the costliest schema that is accepted):
        callers on the event loop run it with ``trio.to_thread.run_sync``.
        """
        value, error = extract_json(text)
        if error is not None:
            return Verdict(None, [error], ["the answer is not JSON"])
        try:
            with _budget(MAX_VALIDATION_STEPS):
                found = sorted(_validator(self.schema).iter_errors(value),
                               key=lambda e: [str(p) for p in e.path])
        except RecursionError:  # a schema that refers to itself without end
            why = "the schema recurses without end; it cannot validate any answer"
            return Verdict(None, [why], [why], repairable=False)
        except TooComplex:
            why = (f"validating the answer took over {MAX_VALIDATION_STEPS} steps: "
                   "the schema is too complex for this answer")
            return Verdict(None, [why], [why], repairable=False)
        if found:
            return Verdict(
                None,
                [f"at {e.json_path}: {e.message[:QUOTE_CHARS]}" for e in found],
                # For the logs: where and which keyword, never the value (it is model output).
                [f"at {e.json_path}: {e.validator} ({_schema_path(e)})" for e in found],
            )
        return Verdict(json.dumps(value, ensure_ascii=False), [], [])

    def _schema_block(self) -> str:
        # The fence label lets the stand-in API (and a reader of the logs) find the schema.
        return "```json-schema\n" + json.dumps(self.schema, ensure_ascii=False) + "\n```"


def _validator_class(schema: dict[str, Any]) -> Any:
    # An explicit default: an unknown "$schema" means the latest draft, without a warning.
    return jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)


def _validator(schema: dict[str, Any]) -> Any:
    """A validator for ``schema`` whose every keyword is counted and whose regexes are RE2."""
    base = _validator_class(schema)
    cls = _BOUNDED.get(base)
    if cls is None:
        keywords = {name: _counted(fn) for name, fn in base.VALIDATORS.items()}
        keywords |= {
            name: _counted(fn) for name, fn in _RE2_KEYWORDS.items() if name in base.VALIDATORS
        }
        cls = _BOUNDED[base] = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
            base, keywords
        )
    return cls(schema, registry=_registry(schema))


_BOUNDED: dict[Any, Any] = {}
_STEPS: contextvars.ContextVar[list[int]] = contextvars.ContextVar("ccwrap_schema_steps")


@contextmanager
def _budget(steps: int) -> Iterator[None]:
    """Allow ``steps`` keyword evaluations in this context (one validation, in one thread)."""
    token = _STEPS.set([steps])
    try:
        yield
    finally:
        _STEPS.reset(token)


def _counted(keyword: Any) -> Any:
    def counted(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        left = _STEPS.get(None)
        if left is not None:
            left[0] -= 1
            if left[0] < 0:
                raise TooComplex
            if left[0] % 64 == 0:
                # Step aside now and then: in a thread, validation would otherwise keep the GIL
                # for whole switch intervals and slow every await of the event loop.
                time.sleep(YIELD_S)
        return keyword(validator, value, instance, schema)

    return counted


# jsonschema matches 'pattern' and 'patternProperties' with Python's backtracking `re`, which is
# exponential on patterns like ^(x+x+)+y$ and holds the GIL throughout: RE2 is linear-time.
def _re2(pattern: str) -> Any:
    compiled = _RE2_CACHE.get(pattern)
    if compiled is None:
        compiled = _RE2_CACHE[pattern] = re2.compile(pattern, options=_RE2_OPTIONS)
    return compiled


_RE2_CACHE: dict[str, Any] = {}
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.max_mem = 8 << 20  # a compiled pattern's memory: huge repetitions are refused
_RE2_OPTIONS.log_errors = False  # RE2 would print the client's pattern to stderr


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    if validator.is_type(instance, "string") and not _re2(pattern).search(instance):
        yield ValidationError(f"{instance[:QUOTE_CHARS]!r} does not match {pattern!r}")


def _pattern_properties(
    validator: Any, patterns: dict[str, Any], instance: Any, schema: Any
) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _re2(pattern).search(key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


_ADDITIONAL_PROPERTIES = jsonschema.Draft202012Validator.VALIDATORS["additionalProperties"]


def _additional_properties(
    validator: Any, additional: Any, instance: Any, schema: Any
) -> Iterator[Any]:
    patterns = schema.get("patternProperties")
    if not patterns or not validator.is_type(instance, "object"):
        yield from _ADDITIONAL_PROPERTIES(validator, additional, instance, schema)
        return
    properties = schema.get("properties", {})
    extras = [
        key for key in instance
        if key not in properties and not any(_re2(p).search(key) for p in patterns)
    ]
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        yield ValidationError(
            f"{len(extras)} properties match none of 'patternProperties' and "
            "'additionalProperties' is false"
        )


_RE2_KEYWORDS: dict[str, Any] = {
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
}


def _check_cost(schema: dict[str, Any], param: str) -> None:
    """400 unless the schema's size is within the limits; iterative, so depth cannot hurt."""
    nodes = 0
    has_pattern_properties = has_unevaluated = False
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise _too_complex(param, f"it nests deeper than {MAX_SCHEMA_DEPTH} levels")
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise _too_complex(param, f"it has more than {MAX_SCHEMA_NODES} objects and arrays")
        children = node.values() if isinstance(node, dict) else node
        if isinstance(node, dict):
            for keyword in ("pattern", "patternProperties"):
                if keyword in node:
                    _check_patterns(node[keyword], param)
            has_pattern_properties |= "patternProperties" in node
            has_unevaluated |= "unevaluatedProperties" in node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    if has_pattern_properties and has_unevaluated:
        # jsonschema evaluates that pair with Python's backtracking regexes (see _re2).
        raise InvalidRequest(
            f"'{param}': 'unevaluatedProperties' together with 'patternProperties' is not "
            "supported.",
            param=param, code="unsupported",
        )


def _check_expansion(schema: dict[str, Any], param: str) -> None:
    """400 when following the '$ref's multiplies the schema (after it is known to be valid)."""
    try:
        expansion = _expansion(schema)
    except RecursionError:  # a chain of thousands of '$ref's
        expansion = MAX_SCHEMA_EXPANSION + 1
    if expansion > MAX_SCHEMA_EXPANSION:
        raise _too_complex(
            param, f"following its '$ref's gives more than {MAX_SCHEMA_EXPANSION} subschemas"
        )


def _check_patterns(value: Any, param: str) -> None:
    patterns = [value] if isinstance(value, str) else list(value) if isinstance(value, dict) else []
    for pattern in patterns:
        try:
            _re2(pattern)
        except re2.error as exc:
            why = exc.args[0].decode(errors="replace") if exc.args else "invalid"
            raise InvalidRequest(
                f"'{param}': the pattern {pattern[:QUOTE_CHARS]!r} is not supported "
                f"({why[:QUOTE_CHARS]}); "
                "patterns are matched with RE2 (no lookaround, no backreferences).",
                param=param, code="unsupported",
            ) from None


def _expansion(schema: dict[str, Any]) -> int:
    """Objects and arrays met when every local '$ref' is followed; a cycle counts once.

    Exponential fan-out (each level two '$ref's to the next) shows here as an exponential count,
    computed in linear time: each '$ref' target is counted once and then remembered.
    """
    registry = _registry(schema)
    sizes: dict[str, int] = {}
    in_progress: set[str] = set()
    limit = MAX_SCHEMA_EXPANSION + 1

    def size_of_ref(ref: str) -> int:
        if ref in sizes:
            return sizes[ref]
        if ref in in_progress or not ref.startswith("#"):
            return 1  # a cycle: its cost is bounded by the answer's depth and the step budget
        in_progress.add(ref)
        try:
            target = registry.resolver().lookup(ref).contents
        except Exception:
            target = None  # reported with a clear message after this check
        sizes[ref] = size(target)
        in_progress.discard(ref)
        return sizes[ref]

    def size(root: Any) -> int:
        total = 0
        stack = [root]
        while stack and total < limit:
            node = stack.pop()
            if not isinstance(node, dict | list):
                continue
            total += 1
            if isinstance(node, dict) and isinstance(node.get("$ref"), str):
                total += size_of_ref(node["$ref"])
            stack.extend(node.values() if isinstance(node, dict) else node)
        return min(total, limit)

    return size(schema)


def _too_complex(param: str, why: str) -> InvalidRequest:
    return InvalidRequest(
        f"'{param}' is too complex: {why}. Simplify the schema.",
        param=param, code="schema_too_complex",
    )


def _schema_path(error: Any) -> str:
    return "/".join(str(part) for part in error.schema_path) or "/"


def _registry(schema: dict[str, Any]) -> referencing.Registry[Any]:
    """A registry holding only this schema: '$ref's resolve inside it, never by retrieval."""
    resource = referencing.Resource.from_contents(
        schema, default_specification=referencing.jsonschema.DRAFT202012
    )
    registry: referencing.Registry[Any] = referencing.Registry().with_resource("", resource)
    return registry


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def extract_json(text: str) -> tuple[Any, str | None]:
    """The JSON value in a model's answer: bare, fenced, or the outermost object/array in prose."""
    stripped = text.strip()
    if not stripped:
        return None, "the answer is empty; it must be a JSON value"
    candidates = [stripped]
    fenced = _FENCE.search(stripped)
    if fenced:
        candidates.append(fenced.group(1).strip())
    for opener, closer in ("{}", "[]"):
        start, end = stripped.find(opener), stripped.rfind(closer)
        if 0 <= start < end:
            candidates.append(stripped[start : end + 1])
    first_error = ""
    for candidate in candidates:
        try:
            return json.loads(candidate), None
        except ValueError as exc:
            first_error = first_error or f"the answer is not JSON: {exc}"
    return None, first_error

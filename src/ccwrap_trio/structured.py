"""Structured outputs: instruct the model with the schema, extract its JSON, validate, repair.

Pure functions, no I/O. The CLI takes one schema per process (``--json-schema``), so a per-request
schema travels in the prompt; what comes back is checked with ``jsonschema`` and, when it does not
validate, the worker sends a repair turn in the same conversation quoting the errors.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import jsonschema
import referencing
import referencing.jsonschema
from jsonschema.exceptions import SchemaError

from .errors import InvalidRequest

# At most this many validation errors are quoted back to the model.
MAX_ERRORS_QUOTED = 8
_FENCE = re.compile(r"```[a-zA-Z0-9_-]*[ \t]*\n(.*?)\n?```", re.DOTALL)


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
                f"got {kind!r}.",
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
        try:
            _validator_class(schema).check_schema(schema)
        except SchemaError as exc:
            raise InvalidRequest(
                f"'{param}' is not a valid JSON Schema: {exc.message}", param=param
            ) from None
        except Exception as exc:  # a malformed "$schema" and the like trip the library itself
            raise InvalidRequest(
                f"'{param}' is not a valid JSON Schema: {exc}", param=param
            ) from None
        for ref in _refs(schema):
            # Only references inside the schema: nothing is ever fetched (no SSRF, no files).
            if not ref.startswith("#"):
                raise InvalidRequest(
                    f"'{param}': only local '$ref's ('#/...') are supported, got {ref!r}.",
                    param=param,
                )
            try:
                _registry(schema).resolver().lookup(ref)
            except Exception:
                raise InvalidRequest(
                    f"'{param}': '$ref' {ref!r} does not resolve inside the schema.", param=param
                ) from None
        try:
            _validator_class(schema)(schema, registry=_registry(schema)).is_valid(None)
        except RecursionError:
            raise InvalidRequest(
                f"'{param}' refers to itself without end: no answer could validate.", param=param
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
        value, error = extract_json(text)
        if error is not None:
            return None, [error]
        validator = _validator_class(self.schema)(self.schema, registry=_registry(self.schema))
        try:
            errors = [
                f"at {error.json_path}: {error.message[:300]}"
                for error in sorted(validator.iter_errors(value), key=lambda e: list(e.path))
            ]
        except RecursionError:  # a schema that refers to itself without end
            return None, ["the schema recurses without end; it cannot validate any answer"]
        if errors:
            return None, errors
        return json.dumps(value, ensure_ascii=False), []

    def _schema_block(self) -> str:
        # The fence label lets the stand-in API (and a reader of the logs) find the schema.
        return "```json-schema\n" + json.dumps(self.schema, ensure_ascii=False) + "\n```"


def _validator_class(schema: dict[str, Any]) -> Any:
    # An explicit default: an unknown "$schema" means the latest draft, without a warning.
    return jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)


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

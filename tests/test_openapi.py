"""docs/openapi.yaml: a valid OpenAPI 3.1 document, and what the server really does.

schemathesis generates requests from the document (valid ones and invalid ones) and sends them to
a live server on 127.0.0.1 running the fake CLI; every answer must be no 5xx, and have a status,
a Content-Type, a body and headers that the document declares for that operation.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import referencing
import referencing.jsonschema
import schemathesis
import yaml
from hypothesis import HealthCheck, event, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ccwrap_trio import app as app_module
from ccwrap_trio import openai_api
from ccwrap_trio.server import Services

from .test_fuzz import ServerThread


def health_until(http: httpx.Client, predicate: Any, timeout_s: float = 30.0) -> None:
    """Poll /health (sync) until ``predicate(body)``: order requests by state, not by sleeps."""
    deadline = time.monotonic() + timeout_s
    while not predicate(http.get("/health").json()):
        assert time.monotonic() < deadline, "the server never reached the awaited state"
        time.sleep(0.02)

SPEC = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
REQUEST_TIMEOUT_S = 20.0

schema = schemathesis.openapi.from_path(SPEC)


def raw_spec() -> dict[str, Any]:
    with SPEC.open(encoding="utf-8") as f:
        document: dict[str, Any] = yaml.safe_load(f)
    return document


# --- the document itself -----------------------------------------------------------------------


def schema_objects(node: Any, path: str = "#") -> Iterator[tuple[str, Any]]:
    """Every Schema Object of the document: under components/schemas and each ``schema`` key."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}/{key}"
            if (key == "schema" and isinstance(value, dict)) or path == "#/components/schemas":
                yield where, value
            else:
                yield from schema_objects(value, where)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from schema_objects(value, f"{path}/{index}")


def test_document_is_valid_openapi_3_1() -> None:
    document = raw_spec()
    assert document["openapi"].startswith("3.1.")
    schema.validate()  # the OpenAPI 3.1 meta-schema (structure; not the Schema Objects)
    # Each Schema Object against the JSON Schema 2020-12 meta-schema, every $ref resolvable.
    resource = referencing.jsonschema.DRAFT202012.create_resource(document)
    registry = referencing.Registry().with_resource("urn:openapi", resource)
    resolver = registry.resolver(base_uri="urn:openapi")
    found = list(schema_objects(document))
    assert len(found) > 20
    for where, schema_object in found:
        try:
            jsonschema.Draft202012Validator.check_schema(schema_object)
        except jsonschema.SchemaError as exc:
            pytest.fail(f"{where}: {exc.message}")
    refs = [ref for _, ref in _refs(document)]
    assert refs
    for ref in refs:
        resolver.lookup(f"urn:openapi{ref}")  # raises if it points nowhere
    # Every example validates against its media type's schema, and the parser accepts it.
    media = document["components"]["requestBodies"]["ChatCompletionRequest"]["content"]
    examples = media["application/json"]["examples"]
    validator = jsonschema.Draft202012Validator(
        {"$ref": "urn:openapi#/components/schemas/ChatCompletionRequest"}, registry=registry
    )
    assert len(examples) >= 4
    for name, example in examples.items():
        errors = [e.message for e in validator.iter_errors(example["value"])]
        assert not errors, (name, errors)
        openai_api.parse_chat_request(json.dumps(example["value"]), default_model="haiku")


def _refs(node: Any) -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield key, value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_document_lists_the_routes_of_the_app(make_config: Any) -> None:
    """Every route of app.py is in the document, and nothing else is."""
    app = Services(make_config()).create_app()  # built, never served
    routes = {
        (re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method.lower())  # <x> is {x}
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods or ()
        if method not in ("HEAD", "OPTIONS")
    }
    documented = {
        (path, method) for path, item in raw_spec()["paths"].items() for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
    assert documented == routes
    # Open routes (no API key) are the ones documented without security.
    open_paths = {
        path for path, item in raw_spec()["paths"].items()
        if all(op.get("security") == [] for op in item.values())
    }
    assert open_paths == {path for path, _ in routes} & app_module.OPEN_PATHS


# --- schemathesis against a live server ---------------------------------------------------------


@pytest.fixture
def live_url(make_config: Any) -> Iterator[str]:
    # No repair turns: the fake echoes, so a structured output fails at once (502).
    with ServerThread(make_config(schema_repairs=0)) as url:
        # /health is 503 until the first session is up ("starting", documented): test the
        # steady state.
        deadline = time.monotonic() + 20
        while httpx.get(f"{url}/health").json()["status"] != "healthy":
            assert time.monotonic() < deadline, "the server did not become healthy"
            time.sleep(0.05)
        yield url


def is_model_failure(case: schemathesis.Case, response: schemathesis.Response) -> bool:
    """A 502 invalid_structured_output: the fake echoes where a model would answer JSON.

    Documented behaviour (docs/openapi.yaml, CliFailed), not a server error; it is still checked
    against the document like any other answer.
    """
    if not isinstance(case.body, dict):
        return False
    if response.status_code == 500 and case.path == "/v1/messages":
        return _is_messages_model_failure(case.body, response)
    if response.status_code != 502:
        return False
    response_format = case.body.get("response_format")
    text = case.body.get("text")  # the Responses API's text.format
    if response_format is None and isinstance(text, dict):
        response_format = text.get("format")
    try:
        code = json.loads(response.content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return False
    demanded = case.body.get("tool_choice") not in (None, "auto", "none") or isinstance(
        case.body.get("function_call"), dict)
    return (
        isinstance(response_format, dict)
        and response_format.get("type") in ("json_object", "json_schema")
        and code == "invalid_structured_output"
    ) or (demanded and code == "invalid_tool_call")  # the fake echoes where a call is demanded


def _is_messages_model_failure(body: dict[str, Any], response: schemathesis.Response) -> bool:
    """The Messages API's form of the same: 500 ``api_error`` (the API's own status for it)."""
    try:
        error = json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    if error.get("type") != "api_error":
        return False
    output_format, tool_choice = body.get("output_format"), body.get("tool_choice")
    structured = isinstance(output_format, dict) and output_format.get("type") == "json_schema"
    demanded = isinstance(tool_choice, dict) and tool_choice.get("type") in ("any", "tool")
    message = str(error.get("message", ""))
    return (structured and message.startswith("the answer did not validate")) or (
        demanded and message.startswith("the model's answer did not fit"))


@schema.parametrize()
@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
def test_server_conforms_to_the_document(case: schemathesis.Case, live_url: str) -> None:
    response = case.call(base_url=live_url, timeout=REQUEST_TIMEOUT_S)
    # Seen with --hypothesis-show-statistics.
    event(f"{response.status_code} {response.headers.get('content-type', [''])[0].split(';')[0]}")
    checks = list(CHECKS)
    if is_model_failure(case, response):
        checks.remove(not_a_server_error)
    case.validate_response(response, checks=checks)


# --- the error statuses, each provoked once and checked against the document -------------------

DOCUMENT_CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
API_KEY = "sk-test-openapi-0123"
CHAT = ("/v1/chat/completions", "POST")
RESPONSES = ("/v1/responses", "POST")


def documented_call(
    base_url: str,
    where: tuple[str, str],
    status: int,
    *,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> schemathesis.Response:
    """One request built from the document's operation, its answer checked against it."""
    path, method = where
    operation = schema[path][method]
    if body is None:
        case = operation.Case(headers=headers or {})
    else:
        case = operation.Case(body=body, headers=headers or {}, media_type="application/json")
    response = case.call(base_url=base_url, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == status, response.text[:500]
    case.validate_response(response, checks=DOCUMENT_CHECKS)
    return response


def chat_body(text: str) -> dict[str, Any]:
    return {"model": "haiku", "messages": [{"role": "user", "content": text}]}


def validate_component(name: str, response: httpx.Response) -> None:
    """404 and 405 come from undeclared paths and methods: checked against components/."""
    document = raw_spec()
    resource = referencing.jsonschema.DRAFT202012.create_resource(document)
    registry = referencing.Registry().with_resource("urn:openapi", resource)
    pointer = f"urn:openapi#/components/responses/{name}/content/application~1json/schema"
    jsonschema.Draft202012Validator({"$ref": pointer}, registry=registry).validate(response.json())
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]


def test_error_statuses_are_documented(make_config: Any) -> None:
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    config = make_config(api_keys=(API_KEY,), max_body_bytes=2048)
    with ServerThread(config) as url:
        for where in (CHAT, RESPONSES, ("/v1/models", "GET"), ("/models", "GET")):
            body = chat_body("hi") if where == CHAT else (
                {"input": "hi"} if where == RESPONSES else None)
            documented_call(url, where, 401, body=body)
            documented_call(url, where, 401, body=body, headers={"x-api-key": "wrong-key-123"})
            documented_call(url, where, 200, body=body, headers=bearer)
            documented_call(url, where, 200, body=body, headers={"x-api-key": API_KEY})
        documented_call(url, ("/health", "GET"), 200)  # open
        documented_call(url, CHAT, 413, body=chat_body("x" * 5000), headers=bearer)
        documented_call(url, CHAT, 400, body={"messages": []}, headers=bearer)
        too_long = documented_call(
            url, CHAT, 400, body=chat_body("FAKE:error=Prompt_is_too_long"), headers=bearer)
        assert too_long.json()["error"]["code"] == "context_length_exceeded"
        for directive, code in (("FAKE:error=boom", "cli_error"), ("FAKE:crash", "cli_crashed"),
                                ("FAKE:empty", "empty_response")):
            failed = documented_call(url, CHAT, 502, body=chat_body(directive), headers=bearer)
            assert failed.json()["error"]["code"] == code
        # A long prompt: the fake's echo (200 characters) never reaches the schema's JSON.
        structured = {**chat_body("not json " * 40), "response_format": {"type": "json_object"}}
        failed = documented_call(url, CHAT, 502, body=structured, headers=bearer)
        assert failed.json()["error"]["code"] == "invalid_structured_output"
        documented_call(url, RESPONSES, 400, body={"input": []}, headers=bearer)
        documented_call(url, RESPONSES, 413, body={"input": "x" * 5000}, headers=bearer)
        failed = documented_call(url, RESPONSES, 502, body={"input": "FAKE:crash"},
                                 headers=bearer)
        assert failed.json()["error"]["code"] == "cli_crashed"

    with (
        ServerThread(make_config(max_queue=1)) as url,
        httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as http,
    ):
        validate_component("NotFound", http.get("/v1/embeddings"))
        validate_component("NotFound", http.post("/v1/completions", json={}))
        validate_component("MethodNotAllowed", http.get("/v1/chat/completions"))
        validate_component("MethodNotAllowed", http.delete("/v1/models"))
        # One request runs, one waits, the third is refused.
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            first = pool.submit(documented_call, url, CHAT, 200, body=chat_body("FAKE:sleep=3 a"))
            health_until(http, lambda h: h["active_queries"] == 1)
            second = pool.submit(documented_call, url, CHAT, 200, body=chat_body("second"))
            health_until(http, lambda h: h["queued"] == 1)
            refused = documented_call(url, CHAT, 429, body=chat_body("third"))
            first.result(), second.result()
        assert int(refused.headers["retry-after"][0]) >= 1  # the backlog's estimate

    with ServerThread(make_config(query_timeout_s=1.0)) as url:
        documented_call(url, CHAT, 504, body=chat_body("FAKE:sleep=2 slow"))

    missing = make_config(claude_bin="/nonexistent/claude", recovery_attempts=1,
                          recovery_max_backoff_s=0.2)
    with ServerThread(missing) as url:
        deadline = time.monotonic() + 20
        while httpx.get(f"{url}/health").json()["status"] != "offline":
            assert time.monotonic() < deadline, "the server did not go offline"
            time.sleep(0.05)
        documented_call(url, ("/health", "GET"), 503)
        ready = documented_call(url, ("/health/ready", "GET"), 503)
        assert ready.json()["reasons"] == ["no CLI session connected (offline)"]
        documented_call(url, ("/health/live", "GET"), 200)
        refused = documented_call(url, CHAT, 503, body=chat_body("hi"))
        assert refused.headers["retry-after"] == ["5"]

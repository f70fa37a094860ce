"""A real Prometheus (Debian's ``prometheus``) scrapes a live server over fake sessions.

It loads the alert rules of container/prometheus-rules.yaml (every rule must evaluate without
error) and runs every query of the Grafana dashboard container/grafana/ccwrap-trio.json, which
must return data: a series with a number, not an empty answer or only NaN.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import yaml

from .conftest import ROOT, running_server
from .fakes import FakeSessions

DASHBOARD = ROOT / "container/grafana/ccwrap-trio.json"
RULES = ROOT / "container/prometheus-rules.yaml"
JOB = "ccwrap-trio"
# Grafana's variables, as the dashboard's "All" selections and a short range expand them. The
# window spans many 0.5 s scrapes, and the whole test runs well inside it.
RATE_INTERVAL = "2m"
KEY = "sk-team-live-prometheus-0001"


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panel_queries() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in dashboard()["panels"]
        for target in panel["targets"]
    ]


def expand(expr: str) -> str:
    """The query Grafana sends with job and instance at "All" and a short rate interval."""
    return (expr.replace("$__rate_interval", RATE_INTERVAL)
            .replace("$instance", ".+").replace("$job", ".+"))


def free_port() -> int:
    # Prometheus cannot report a port it picked itself; the tiny race is harmless on 127.0.0.1.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_dashboard_panels_use_the_datasource_variable_and_known_metrics() -> None:
    board = dashboard()
    assert board["uid"] == "ccwrap-trio"
    names = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= names
    titles = [panel["title"] for panel in board["panels"]]
    assert len(titles) == len(set(titles))
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    exprs = " ".join(expr for _title, expr in panel_queries())
    # What the dashboard must show (issue 15): each of these metrics appears in some panel.
    for metric in ("ccwrap_requests_total", "ccwrap_http_requests_total",
                   "ccwrap_request_duration_seconds_bucket",
                   "ccwrap_time_to_first_token_seconds_bucket", "ccwrap_queue_depth",
                   "ccwrap_session_up", "ccwrap_restarts_total",
                   "ccwrap_server_resident_memory_bytes", "ccwrap_cli_resident_memory_bytes",
                   "ccwrap_usage_limit_utilization", "ccwrap_usage_limited",
                   "ccwrap_key_tokens_total", "ccwrap_key_requests_total"):
        assert metric in exprs, metric


async def _wait_query(client: httpx.AsyncClient, query: str, predicate: Any) -> list[Any]:
    """Poll an instant query until ``predicate(result)``; bounded by the caller's fail_after."""
    while True:
        response = await client.get("/api/v1/query", params={"query": query})
        if response.status_code == 200:
            result: list[Any] = response.json()["data"]["result"]
            if predicate(result):
                return result
        await trio.sleep(0.1)


def _finite(result: list[Any]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


async def test_prometheus_scrapes_loads_the_rules_and_every_panel_returns_data(
    make_config: Any, tmp_path: Path
) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (Debian: apt-get install prometheus)")
    # A named client key (tokens per key), and in-memory sessions that can report a used-up
    # usage window (the fake CLI cannot): every panel then has data to show.
    async with running_server(
        make_config(api_keys=(f"team:{KEY}",)), session_factory_override=FakeSessions()
    ) as url, httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {KEY}"}
    ) as http:
        port = free_port()
        config = {
            "global": {"scrape_interval": "500ms", "evaluation_interval": "500ms"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{
                "job_name": JOB,
                "static_configs": [{"targets": [url.removeprefix("http://")]}],
            }],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        command = [
            prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        ]
        with (tmp_path / "prometheus.log").open("wb") as log:
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(
                    trio.run_process, command, stdout=log, stderr=log, check=False))
                prom = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}")
                try:
                    with trio.fail_after(30):
                        await _check(http, prom)
                except trio.TooSlowError:
                    pytest.fail("Prometheus: " + (tmp_path / "prometheus.log").read_text())
                finally:
                    await prom.aclose()
                    nursery.cancel_scope.cancel()


async def _check(http: httpx.AsyncClient, prom: httpx.AsyncClient) -> None:
    while True:
        try:
            if (await prom.get("/-/ready")).status_code == 200:
                break
        except httpx.TransportError:
            pass
        await trio.sleep(0.1)
    # A first scrape before any request, so the rates below see the counters grow.
    await _wait_query(prom, f'up{{job="{JOB}"}} == 1', bool)

    body = {"model": "haiku", "messages": [{"role": "user", "content": "hello"}]}
    for _ in range(3):
        assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
    # An error by code and endpoint: an invalid request (400) and an unknown route (404).
    assert (await http.post("/v1/chat/completions", json={"model": "haiku"})).status_code == 400
    assert (await http.get("/v1/nothing-here")).status_code == 404
    await _wait_query(prom, 'ccwrap_requests_total{outcome="success"} == 3', bool)
    # The subscription's 5-hour window used up: a 429, and the window in /metrics.
    limited = {"model": "haiku", "messages": [{"role": "user", "content": "usage-limit=3600"}]}
    assert (await http.post("/v1/chat/completions", json=limited)).status_code == 429
    await _wait_query(prom, "ccwrap_usage_limited == 1", bool)
    # Two samples of the newest series (the 400s), so each series has a rate.
    await _wait_query(
        prom, f'count_over_time(ccwrap_http_requests_total{{status="400"}}[{RATE_INTERVAL}]) >= 2',
        bool)

    # Every alert rule loaded and evaluated without error.
    expected = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"]
                for rule in group["rules"]}
    while True:
        groups = (await prom.get("/api/v1/rules")).json()["data"]["groups"]
        loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
        assert set(loaded) == expected
        errors = {name: rule["lastError"] for name, rule in loaded.items() if rule.get("lastError")}
        assert not errors
        if all(rule["health"] == "ok" for rule in loaded.values()):
            break
        await trio.sleep(0.1)

    # Every panel's query returns a number (histogram quantiles included: requests were made
    # inside the rate window).
    for title, expr in panel_queries():
        query = expand(expr)
        assert not re.search(r"\$\w", query), (title, query)
        response = await prom.get("/api/v1/query", params={"query": query})
        assert response.status_code == 200, (title, query, response.text)
        result = response.json()["data"]["result"]
        assert _finite(result), (title, query, result)

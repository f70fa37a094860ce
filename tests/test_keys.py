"""Client keys with names: parsing, usage per key that adds up to the totals, limits per key,
keys never shown, and a key file reloaded on SIGHUP without dropping a request.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from ccwrap_trio.config import Config
from ccwrap_trio.errors import ConfigError, KeyQuotaExceeded
from ccwrap_trio.keys import KeyAccount, KeyLimit, KeyRing, derived_name, parse_key_limits
from ccwrap_trio.protocol import Usage

from .conftest import running_server, wait_for_health

ALICE = "alice-secret-0001"
BATCH = "batch-secret-0002"
PLAIN = "plain-secret-0003"


def chat(text: str) -> dict[str, Any]:
    return {"model": "haiku", "messages": [{"role": "user", "content": text}]}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_names_and_plain_keys() -> None:
    ring = KeyRing((f"alice:{ALICE}", PLAIN))
    assert ring.names() == ["alice", derived_name(PLAIN)]
    assert derived_name(PLAIN).startswith("key-") and PLAIN not in derived_name(PLAIN)
    assert ring.match(ALICE).name == "alice"  # type: ignore[union-attr]
    assert ring.match(PLAIN).name == derived_name(PLAIN)  # type: ignore[union-attr]
    assert ring.match("alice") is None and ring.match(f"alice:{ALICE}") is None
    assert ALICE not in repr(ring) and ALICE not in repr(ring.match(ALICE))


def test_config_errors_never_show_a_key() -> None:
    with pytest.raises(ConfigError) as caught:
        Config.load({"CCWRAP_API_KEYS": "alice:short"})
    assert "short" not in str(caught.value).replace("shorter", "")
    with pytest.raises(ConfigError):
        Config.load({"CCWRAP_API_KEYS": f"alice:{ALICE},alice:{BATCH}"})  # one name twice
    config = Config.load({"CCWRAP_API_KEYS": f"alice:{ALICE}",
                          "CCWRAP_KEY_LIMITS": "alice=in_flight:2,tokens:500/60; *=in_flight:8"})
    assert config.key_limits == {"alice": KeyLimit(2, 500, 60.0), "*": KeyLimit(8, None)}
    assert ALICE not in repr(config)
    with pytest.raises(ConfigError):
        Config.load({"CCWRAP_KEY_LIMITS": "alice=in_flight:zero"})
    assert parse_key_limits("") == {}


async def test_token_window_limit_and_its_retry_after() -> None:
    account = KeyAccount("batch", KeyLimit(max_tokens=100, window_s=60.0))
    now = trio.current_time()
    account.admit(now, slot_wait_s=1.0)
    account.used(Usage(input_tokens=40, output_tokens=10), now)
    account.used(Usage(input_tokens=50, output_tokens=10), now + 10)
    with pytest.raises(KeyQuotaExceeded) as caught:
        account.admit(now + 20, slot_wait_s=1.0)
    # 110 tokens in the window: free again when the first 50 leave it, at now + 60.
    assert caught.value.limit == "tokens" and caught.value.retry_after_s == 40
    account.admit(now + 60, slot_wait_s=1.0)
    assert account.window_tokens(now + 60) == 60


async def test_per_key_usage_adds_up_to_the_totals(make_config: Any) -> None:
    config = make_config(api_keys=(f"alice:{ALICE}", f"batch:{BATCH}", PLAIN))
    async with running_server(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        for key, text in ((ALICE, "one"), (ALICE, "two FAKE:tokens=50"), (BATCH, "three"),
                          (BATCH, "FAKE:error=boom"), (PLAIN, "four")):
            await http.post("/v1/chat/completions", json=chat(text), headers=bearer(key))
        assert (await http.post("/v1/chat/completions", json=chat("x"),
                                headers=bearer("wrong-key-0000"))).status_code == 401
        metrics_text = (await http.get("/metrics")).text
        health = (await http.get("/health")).json()
        status_page = (await http.get("/status/history")).json()
    metrics = samples(metrics_text)
    for outcome in ("success", "error", "rejected"):
        per_key = sum(v for k, v in metrics.items()
                      if k.startswith("ccwrap_key_requests_total{") and f'outcome="{outcome}"' in k)
        assert per_key == metrics[f'ccwrap_requests_total{{outcome="{outcome}"}}']
    for kind in ("prompt", "completion", "cached"):
        per_key = sum(v for k, v in metrics.items()
                      if k.startswith("ccwrap_key_tokens_total{") and f'kind="{kind}"' in k)
        assert per_key == metrics[f'ccwrap_tokens_total{{kind="{kind}"}}'] > 0
    assert metrics['ccwrap_key_requests_total{key="alice",outcome="success"}'] == 2
    assert metrics['ccwrap_key_requests_total{key="batch",outcome="error"}'] == 1
    assert health["keys"]["alice"]["requests"] == {"success": 2, "error": 0, "rejected": 0}
    assert health["keys"][derived_name(PLAIN)]["requests"]["success"] == 1
    assert set(status_page["keys"]) == {"alice", "batch", derived_name(PLAIN)}
    for shown in (metrics_text, str(health), str(status_page)):
        for secret in (ALICE, BATCH, PLAIN):
            assert secret not in shown


async def test_key_over_its_in_flight_limit_gets_429_while_another_is_served(
    make_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(api_keys=(f"alice:{ALICE}", f"batch:{BATCH}"),
                         key_limits={"batch": KeyLimit(max_in_flight=1)})
    async with running_server(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        answers: dict[str, httpx.Response] = {}

        async def ask(name: str, key: str, text: str) -> None:
            answers[name] = await http.post("/v1/chat/completions", json=chat(text),
                                            headers=bearer(key))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "batch-1", BATCH, "FAKE:sleep=1 long batch job")
            await wait_for_health(http, lambda h: h["keys"].get("batch", {}).get("in_flight"))
            await ask("batch-2", BATCH, "one more")
            await ask("alice", ALICE, "alice is served")
        health = (await http.get("/health")).json()
    refused = answers["batch-2"]
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "key_quota_exceeded"
    assert "'batch'" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert answers["batch-1"].status_code == 200
    assert answers["alice"].status_code == 200
    assert health["keys"]["batch"]["requests"] == {"success": 1, "error": 0, "rejected": 1}
    assert health["keys"]["batch"]["in_flight"] == 0
    for secret in (ALICE, BATCH):
        assert secret not in caplog.text


async def test_key_file_reloads_on_sighup_without_dropping_requests(
    make_config: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text(f"# team keys\nalice:{ALICE}\n")
    config = make_config(api_keys_file=key_file)
    async with running_server(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        assert (await http.post("/v1/chat/completions", json=chat("x"),
                                headers=bearer(BATCH))).status_code == 401
        answers: list[httpx.Response] = []

        async def slow_alice() -> None:
            answers.append(await http.post("/v1/chat/completions",
                                           json=chat("FAKE:sleep=1 in flight"),
                                           headers=bearer(ALICE)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_alice)
            await wait_for_health(http, lambda h: h["active_queries"] == 1)
            key_file.write_text(f"batch:{BATCH}\n")  # alice's key is revoked mid-request
            os.kill(os.getpid(), signal.SIGHUP)
            with trio.fail_after(10):
                while (await http.post("/v1/chat/completions", json=chat("y"),
                                       headers=bearer(BATCH))).status_code == 401:
                    await trio.sleep(0.05)
        assert [a.status_code for a in answers] == [200]  # the request in flight finished
        assert (await http.post("/v1/chat/completions", json=chat("z"),
                                headers=bearer(ALICE))).status_code == 401
        key_file.write_text("broken:short\n")  # a bad file keeps the keys there are
        os.kill(os.getpid(), signal.SIGHUP)
        with trio.fail_after(10):
            while "Keys not reloaded" not in caplog.text:
                await trio.sleep(0.05)
        assert "short" not in caplog.text.replace("shorter", "")
        assert (await http.post("/v1/chat/completions", json=chat("w"),
                                headers=bearer(BATCH))).status_code == 200

"""The isolation check of bench/peers.py: the nonce stand-in names the other requests' nonces a
conversation holds, so a client sees a leak in the answer (and sees none when there is none)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from nonce_standin import SAW_RE, NonceStandin, other_nonces

from ccwrap_trio.standin import StandinConfig

A, B, C = "nonce-0000000a", "nonce-0000000b", "nonce-0000000c"


@pytest.fixture
async def client(nursery: trio.Nursery) -> AsyncIterator[httpx.AsyncClient]:
    standin: NonceStandin = await nursery.start(NonceStandin(StandinConfig()).serve)
    async with httpx.AsyncClient(base_url=standin.url, timeout=10) as http:
        yield http


def body(*turns: tuple[str, str], stream: bool = False) -> dict[str, Any]:
    return {
        "model": "claude-haiku-4-5", "max_tokens": 100, "stream": stream,
        "messages": [{"role": role, "content": text} for role, text in turns],
    }


async def answer(client: httpx.AsyncClient, payload: dict[str, Any]) -> str:
    response = await client.post("/v1/messages", json=payload)
    assert response.status_code == 200
    text: str = response.json()["content"][0]["text"]
    return text


def test_other_nonces_skip_the_last_user_text_and_repeats() -> None:
    conversation = body(("user", f"one {A}"), ("assistant", f"echo: one {A}"),
                        ("user", f"two {B} {B}"), ("assistant", "ok"), ("user", f"three {C}"))
    assert other_nonces(conversation) == [A, B]
    assert other_nonces(body(("user", f"alone {A}"))) == []


async def test_an_isolated_request_sees_no_other_nonce(client: httpx.AsyncClient) -> None:
    text = await answer(client, body(("user", f"benchmark request 1 {A}")))
    assert text == f"echo: benchmark request 1 {A} | saw 0 other nonces: "
    match = SAW_RE.search(text)
    assert match is not None and match.group(1) == "0"


async def test_a_conversation_with_earlier_requests_is_seen_as_leaking(
    client: httpx.AsyncClient,
) -> None:
    # What a CLI that keeps one conversation sends on its third request.
    text = await answer(client, body(
        ("user", f"benchmark request 1 {A}"), ("assistant", "echo"),
        ("user", f"benchmark request 2 {B}"), ("assistant", "echo"),
        ("user", f"benchmark request 3 {C} [standin:latency=0]"),
    ))
    assert text.startswith(f"echo: benchmark request 3 {C} | saw 2 other nonces: {A} {B}")


async def test_streamed_answers_carry_the_count_too(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/messages", json=body(("user", f"x {A}"), ("assistant", "y"), ("user", f"z {B}"),
                                  stream=True))
    deltas = [line for line in response.text.splitlines() if '"text_delta"' in line]
    assert "saw" in "".join(deltas) and A in "".join(deltas)

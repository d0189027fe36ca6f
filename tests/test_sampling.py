"""Sampling controls reach the request; `samples: N` expands an agent; bad settings are refused."""

from __future__ import annotations

import hashlib
import json

import pytest

from moa import parse_config
from moa.errors import ConfigError
from moa.providers.base import ChatRequest
from moa.providers.cache import cache_key
from moa.testing import FakeOpenAIServer
from tests.conftest import MoAMaker, agents

QUESTION = "Name a prime number."


def test_sampling_settings_reach_the_request_top_level_and_per_agent(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    moa = make_moa(
        proposers=[
            {"model": "p1"},
            {"model": "p2", "frequency_penalty": -0.5, "stop": ["END"], "presence_penalty": 0},
        ],
        aggregator={"model": "agg", "stop": ["\n\n", "###"]},
        frequency_penalty=0.4,
        presence_penalty=0.3,
    )
    moa.run(QUESTION)
    (p1,) = fake.requests_for("p1")
    (p2,) = fake.requests_for("p2")
    (agg,) = fake.requests_for("agg")
    assert p1.body["frequency_penalty"] == 0.4
    assert p1.body["presence_penalty"] == 0.3
    assert "stop" not in p1.body
    assert p2.body["frequency_penalty"] == -0.5
    assert p2.body["presence_penalty"] == 0
    assert p2.body["stop"] == ["END"]
    assert agg.body["stop"] == ["\n\n", "###"]
    assert agg.body["frequency_penalty"] == 0.4
    # Never sent unless asked: llama.cpp's fields and log-probabilities.
    for request in fake.requests:
        for key in ("repeat_penalty", "min_p", "logprobs", "top_logprobs"):
            assert key not in request.body


def test_unset_sampling_settings_are_not_sent(fake: FakeOpenAIServer, make_moa: MoAMaker) -> None:
    make_moa(proposers=agents("p1"), aggregator={"model": "agg"}).run(QUESTION)
    for request in fake.requests:
        assert not {"frequency_penalty", "presence_penalty", "stop"} & set(request.body)


@pytest.mark.parametrize("key", ["repeat_penalty", "min_p"])
def test_llama_only_settings_on_an_http_provider_are_a_clear_config_error(key: str) -> None:
    data = {
        "providers": {"remote": {"base_url": "http://127.0.0.1:9/v1"}},
        "proposers": [{"model": "m", key: 0.1}],
        "aggregator": {"model": "m"},
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    message = str(caught.value)
    assert "\n" not in message
    assert key in message and "layer 1, agent 1" in message and "llama-cpp" in message


def test_llama_only_settings_are_accepted_for_the_embedded_model() -> None:
    config = parse_config(
        {
            "providers": {"local": {"type": "llama-cpp"}},
            "proposers": [{"repeat_penalty": 1.3, "min_p": 0.1}],
            "aggregator": {},
            "repeat_penalty": 1.1,
        }
    )
    pipeline = config.resolve()
    assert pipeline.layers[0].agents[0].repeat_penalty == 1.3
    assert pipeline.layers[0].agents[0].min_p == 0.1
    assert pipeline.aggregator.repeat_penalty == 1.1


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": "END"}, "stop"),
        ({"samples": 0}, "samples"),
    ],
)
def test_out_of_range_settings_name_the_key(setting: dict[str, object], fragment: str) -> None:
    data = {
        "providers": {"remote": {"base_url": "http://127.0.0.1:9/v1"}},
        "proposers": [{"model": "m", **setting}],
        "aggregator": {"model": "m"},
    }
    with pytest.raises(ConfigError, match=fragment):
        parse_config(data)


def _pipeline(proposers: list[dict[str, object]], **top: object):  # type: ignore[no-untyped-def]
    config = parse_config(
        {
            "providers": {"remote": {"base_url": "http://127.0.0.1:9/v1"}},
            "proposers": proposers,
            "aggregator": {"model": "agg"},
            **top,
        }
    )
    return config.resolve()


def test_samples_expands_an_agent_with_consecutive_seeds() -> None:
    pipeline = _pipeline(
        [{"model": "big", "temperature": 0}, {"model": "m", "samples": 4, "seed": 10}]
    )
    (layer,) = pipeline.layers
    assert [a.model for a in layer.agents] == ["big", "m", "m", "m", "m"]
    assert [a.seed for a in layer.agents] == [None, 10, 11, 12, 13]
    assert pipeline.call_count == 6


def test_samples_without_a_seed_sample_afresh_and_an_inherited_seed_is_offset() -> None:
    fresh = _pipeline([{"model": "m", "samples": 3, "temperature": 0.9}])
    assert [(a.seed, a.temperature) for a in fresh.layers[0].agents] == [(None, 0.9)] * 3
    inherited = _pipeline([{"model": "m", "samples": 3}], seed=5)
    assert [a.seed for a in inherited.layers[0].agents] == [5, 6, 7]


def test_samples_repeat_in_every_layer_of_the_short_form() -> None:
    pipeline = _pipeline([{"model": "m", "samples": 2}], layers=3)
    assert [len(layer.agents) for layer in pipeline.layers] == [2, 2]


def test_min_ok_counts_the_expanded_agents() -> None:
    assert _pipeline([{"model": "m", "samples": 3}], min_ok=3).layers[0].min_ok == 3
    with pytest.raises(ConfigError, match="min_ok is 4"):
        _pipeline([{"model": "m", "samples": 3}], min_ok=4)


def test_samples_on_the_aggregator_is_refused() -> None:
    with pytest.raises(ConfigError, match="samples"):
        parse_config(
            {
                "providers": {"remote": {"base_url": "http://127.0.0.1:9/v1"}},
                "proposers": [{"model": "m"}],
                "aggregator": {"model": "agg", "samples": 2},
            }
        )


def test_expanded_samples_are_distinct_calls(fake: FakeOpenAIServer, make_moa: MoAMaker) -> None:
    moa = make_moa(proposers=[{"model": "m", "samples": 3, "seed": 1}], aggregator={"model": "a"})
    result = moa.run(QUESTION)
    seeds = sorted(r.body["seed"] for r in fake.requests_for("m"))
    assert seeds == [1, 2, 3]
    assert len(result.layers[0].agents) == 3


def test_new_settings_change_the_cache_key_only_when_set() -> None:
    base = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    plain = cache_key("http://x/v1", base)
    # A request without the new settings keeps the key it had before they existed.
    before = {
        "base_url": "http://x/v1",
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": None,
        "max_tokens": None,
        "top_p": None,
        "seed": None,
        "sample": 0,
    }
    text = json.dumps(before, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert plain == hashlib.sha256(text.encode()).hexdigest()
    keys = {
        cache_key("http://x/v1", ChatRequest(model="m", messages=base.messages, **change))
        for change in (
            {"frequency_penalty": 0.5},
            {"presence_penalty": 0.5},
            {"stop": ["x"]},
            {"repeat_penalty": 1.2},
            {"min_p": 0.1},
        )
    }
    assert len(keys) == 5 and plain not in keys
    # Asking for log-probabilities does not change the answer: same key (see test_cache).
    asking = ChatRequest(model="m", messages=base.messages, logprobs=True, top_logprobs=5)
    assert cache_key("http://x/v1", asking) == plain

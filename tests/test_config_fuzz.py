"""Structured fuzzing of configs: documents shaped like real configs, with hostile values where
numbers, URLs and names go. Whatever comes in, loading gives a config that builds its
providers, or one ConfigError line; never another exception, a hang or a huge allocation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yarl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moa import ConfigError, MoA, load_config, parse_config
from moa.config import MAX_DEPTH, MAX_NODES, OpenAIProviderConfig
from moa.env import Environment

# Values that broke loading or building before, and their neighbours.
_hostile_ints = st.one_of(
    st.integers(-3, 3),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([10**5000, 10**12, 1_000_000, 99999, 65536, 2**63, -(2**63) - 1]),
)
_hostile_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([5e-324, 1e-300, 1e308, 0.0, -0.0, 1e-9]),
)
_numbers = st.one_of(_hostile_ints, _hostile_floats, st.text(max_size=4), st.none())

_hosts = st.sampled_from(
    [
        "127.0.0.1",
        "h",
        "api.example.com",
        "2852039166",
        "0xA9FEA9FE",
        "0177.0.0.1",
        "169.254.43518",
        "169.254.169.254.",
        "[::ffff:169.254.169.254]",
        "[::ffff:a9fe:a9fe]",
        "[fd00:ec2::254]",
        "[::1]",
        "[fe80::1%25eth0]",
        "metadata.google.internal.",
        "1.2.3",
        "999.1.1.1",
        "[::1",
        "a b",
        "",
    ]
)
_ports = st.one_of(
    st.just(""), st.sampled_from([":0", ":80", ":99999", ":-1", ":x", ":65535", ":"])
)
_urls = st.builds(
    lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
    st.sampled_from(["http", "https", "ftp", "file", ""]),
    _hosts,
    _ports,
    st.sampled_from(["/v1", "", "/v1/", "/a?b=c"]),
)
_env_names = st.one_of(
    st.sampled_from(["FUZZ_KEY", "sk-abc123", "0123456789abcdef0123456789abcdef", "A B", ""]),
    st.from_regex(r"[A-Z][A-Z0-9_]{0,20}", fullmatch=True),
)

#: Where a hostile value can go in an otherwise valid config, and what to put there.
_AGENT_FIELDS = (
    "temperature",
    "max_tokens",
    "top_p",
    "seed",
    "timeout",
    "first_token_timeout",
    "max_attempts",
    "max_retry_wait",
    "context_window",
)
_PROVIDER_FIELDS = ("rpm", "tpm", "max_concurrency", "context_window")
_mutations = st.one_of(
    st.tuples(st.just(("providers", "a", "base_url")), _urls),
    st.tuples(st.just(("providers", "a", "api_key_env")), _env_names),
    st.tuples(st.sampled_from([("providers", "a", f) for f in _PROVIDER_FIELDS]), _numbers),
    st.tuples(
        st.just(("providers", "a", "prices")),
        st.builds(lambda n: {"*": {"input": n, "output": 1}}, _numbers),
    ),
    st.tuples(
        st.sampled_from(
            [(where, f) for where in ("aggregator", "proposers.0", "") for f in _AGENT_FIELDS]
        ),
        _numbers,
    ),
    st.tuples(
        st.sampled_from([("layers",), ("min_ok",), ("max_total_tokens",), ("layer_timeout",)]),
        _numbers,
    ),
    st.tuples(
        st.just(("layers",)), st.lists(st.lists(st.just({"model": "m"}), max_size=3), max_size=4)
    ),
)


def _valid_config() -> dict[str, Any]:
    return {
        "providers": {"a": {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "FUZZ_KEY"}},
        "proposers": [{"model": "p1"}, {"model": "p2"}],
        "aggregator": {"model": "agg"},
        "layers": 2,
    }


def _mutated(mutations: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    data = _valid_config()
    for path, value in mutations:
        target: Any = data
        parts = [p for part in path for p in part.split(".") if p]
        for part in parts[:-1]:
            target = target[int(part)] if isinstance(target, list) else target[part]
        target[parts[-1]] = value
    return data


#: What a loaded config may contain at most: past these, runs hang, allocate without end or
#: divide by zero (a million layers, rpm 5e-324). The schema must refuse anything beyond.
SANE = {"layers": 101, "calls": 101 * 257, "tokens": 10**12, "seconds": 7 * 24 * 3600}


def _check_sane(config: Any) -> None:
    for pipeline in config.pipelines.values():
        if isinstance(pipeline.layers, int):
            assert pipeline.layers <= SANE["layers"]
    for provider in config.providers.values():
        if provider.rpm is not None:
            assert 1 / 60 <= provider.rpm <= 1e9
        if provider.tpm is not None:
            assert 1 <= provider.tpm <= 1e12
        if provider.base_url:
            yarl.URL(provider.base_url)  # what the HTTP client (aiohttp) will make of it


def _build(data: dict[str, Any]) -> None:
    """Load, check the values are sane, then build the providers as a run does (no request)."""
    config = parse_config(data, source="fuzz.yaml")
    _check_sane(config)
    http = [p for p in config.providers.values() if isinstance(p, OpenAIProviderConfig)]
    names = {p.api_key_env for p in http if p.api_key_env}
    env = Environment({name: "sk-fuzz-0123456789abcdef" for name in names})
    moa = MoA.from_config(config, env=env)
    try:
        pipeline = moa.pipeline
        assert pipeline.call_count <= SANE["calls"]
        for agent in (a for layer in pipeline.layers for a in layer.agents):
            assert agent.max_tokens <= SANE["tokens"] and agent.timeout <= SANE["seconds"]
            assert agent.max_retry_wait <= SANE["seconds"]
    finally:
        moa.close()


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(_mutations, min_size=1, max_size=3))
def test_structured_configs_build_or_give_one_clear_error(
    mutations: list[tuple[tuple[str, ...], Any]],
) -> None:
    try:
        _build(_mutated(mutations))
    except ConfigError as error:
        message = str(error)
        assert message.startswith("fuzz.yaml: ") and "\n" not in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: " + "[" * 1000 + "]" * 1000, "nested"),
        ("a: " + "{b: " * 1000 + "1" + "}" * 1000, "nested"),
        ("max_tokens: 1" + "0" * 5000, "cannot be read"),
        (
            "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
            + "".join(
                f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                for p, c in zip("abcdefgh", "bcdefghi", strict=True)
            ),
            f"more than {MAX_NODES} values",
        ),
        (
            "providers: {x: {base_url: 'http://h/v1'}}\naggregator: {model: m}\n"
            "proposers: [{model: m}]\nlayers: 1000000000000",
            "layers",
        ),
        (
            "providers: {x: {base_url: 'http://h/v1', rpm: 5e-324}}\naggregator: {model: m}\n"
            "layers: 1",
            "rpm",
        ),
        (
            "providers: {x: {base_url: 'http://h:99999/v1'}}\naggregator: {model: m}\nlayers: 1",
            "Port out of range",
        ),
        (
            "providers: {x: {base_url: 'http://0177.0.0.1:8/v1'}}\n"
            "aggregator: {model: m}\nlayers: 1",
            "write it as four decimal numbers: 127.0.0.1",
        ),
    ],
)
def test_hostile_yaml_is_one_error_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert expected in message and "\n" not in message and len(message) < 600


def test_depth_limit_is_checked_before_validation() -> None:
    deep: Any = "m"
    for _ in range(MAX_DEPTH + 5):
        deep = {"x": deep}
    with pytest.raises(ConfigError, match=f"nested more than {MAX_DEPTH} levels"):
        parse_config({"aggregator": deep})

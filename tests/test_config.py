"""Config loading: valid files resolve as documented; bad ones get one clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moa import ConfigError, MoA, load_config, parse_config
from moa.config import load_providers
from moa.env import Environment
from moa.presets import PRESETS, preset_config

GOOD = """
providers:
  together: {base_url: https://api.together.xyz/v1, api_key_env: TOGETHER_API_KEY}
  local: {type: llama-cpp}
proposers:
  - {provider: together, model: meta-llama/Llama-3.3-70B-Instruct-Turbo}
  - {provider: together, model: Qwen/Qwen2.5-72B-Instruct-Turbo, temperature: 0.5}
aggregator: {provider: together, model: Qwen/Qwen2.5-72B-Instruct-Turbo, max_tokens: 2048}
layers: 3
temperature: 0.7
max_tokens: 512
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "moa.yaml"
    path.write_text(text)
    return path


def test_the_documented_short_form_resolves(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    pipeline = config.resolve()
    assert pipeline.total_layers == 3 and len(pipeline.layers) == 2
    first, second = pipeline.layers[0].agents
    assert (first.temperature, first.max_tokens) == (0.7, 512)
    assert second.temperature == 0.5
    assert pipeline.aggregator.max_tokens == 2048
    assert pipeline.call_count == 2 * 2 + 1


def test_the_single_pipeline_form_is_the_named_form_with_defaults(tmp_path: Path) -> None:
    """One shape: a file without `pipelines:` reads as one pipeline, `moa`, its other top-level
    settings defaults; a preset's pipeline is named after it."""
    inline = load_config(write(tmp_path, GOOD + "references_in: user\nmin_ok: 2\n"))
    data = yaml.safe_load(GOOD + "references_in: user\nmin_ok: 2\n")
    named = parse_config(
        {
            **{k: v for k, v in data.items() if k not in ("proposers", "aggregator", "layers")},
            "pipelines": {"moa": {k: data[k] for k in ("proposers", "aggregator", "layers")}},
        }
    )
    assert list(inline.pipelines) == ["moa"]
    assert inline.resolve() == named.resolve("moa")
    assert inline.resolve().references_in == "user"
    assert inline.resolve().layers[0].min_ok == 2
    assert list(preset_config("together").pipelines) == ["together"]
    with pytest.raises(ConfigError, match="no pipeline named 'fast'; the config has: moa"):
        inline.resolve("fast")


def test_a_misspelt_key_is_reported_before_what_it_causes(tmp_path: Path) -> None:
    path = write(tmp_path, "providers: {x: {base_url: http://h/v1}}\naggregater: {model: m}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: aggregater: unknown key")


def test_a_judge_file_needs_only_providers(tmp_path: Path) -> None:
    path = write(tmp_path, "providers: {x: {base_url: http://h/v1}}\nenv_file: keys.env\n")
    providers, env_file = load_providers(path)
    assert providers["x"].endpoint() == "http://h/v1"
    assert env_file == str(tmp_path / "keys.env")
    for text, message in (
        ("aggregator: {model: m}", "needs a `providers:` mapping naming the provider"),
        ("providers: {x: {base_url: ftp://h}}", "providers.x.base_url: must be an http://"),
    ):
        with pytest.raises(ConfigError) as caught:
            load_providers(write(tmp_path, text))
        assert message in str(caught.value) and "\n" not in str(caught.value)


def test_named_pipelines_share_providers_and_top_level_defaults() -> None:
    config = parse_config(
        {
            "providers": {"local": {"base_url": "http://127.0.0.1:9/v1"}},
            "temperature": 0.2,
            "pipelines": {
                "small": {"proposers": [{"model": "a"}], "aggregator": {"model": "b"}},
                "big": {
                    "proposers": [{"model": "a"}, {"model": "c"}],
                    "aggregator": {"model": "b"},
                    "layers": 3,
                },
            },
        }
    )
    assert set(config.pipelines) == {"small", "big"}
    big = config.resolve("big")
    assert big.layers[0].agents[0].temperature == 0.2 and big.total_layers == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "providers: {x: {base_url: http://h/v1}}\naggregator: {model: m}\ntemprature: 1",
            "temprature: unknown key",
        ),
        (
            "providers: {x: {base_url: http://h/v1}}\naggregator: {model: m, temperature: 9}",
            "aggregator.temperature: Input should be less than or equal to 2",
        ),
        (
            "providers: {x: {base_url: ftp://h/v1}}\naggregator: {model: m}",
            "providers.x.base_url: must be an http:// or https:// URL",
        ),
        (
            "providers: {x: {base_url: 'http://169.254.169.254/v1'}}\naggregator: {model: m}",
            "refusing link-local / cloud-metadata address 169.254.169.254",
        ),
        (
            "providers: {x: {base_url: 'http://[fd00:ec2::254]/v1'}}\naggregator: {model: m}",
            "cloud-metadata address fd00:ec2::254",
        ),
        (
            "providers: {x: {base_url: http://h/v1}}\nlayers: 1\n"
            "aggregator: {model: m, provider: y}",
            "provider 'y', which is not under 'providers'",
        ),
        (
            "providers: {x: {base_url: http://h/v1}}\nlayers: 3\naggregator: {model: m}",
            "proposers: layers is 3, so at least one proposer is needed",
        ),
        (
            "providers: {x: {base_url: http://h/v1}}\nproposers: [{model: a}]",
            "aggregator: required",
        ),
        (
            "providers: {x: {base_url: http://h/v1}}\nlayers: 1\naggregator: {}",
            "'model' is required",
        ),
        (
            "providers: {x: {base_url: http://h/v1}}\naggregator: {model: m}",
            "layers is 2 (the default), so at least one proposer is needed",
        ),
        (
            "providers: {x: {base_url: http://h/v1, api_key_env: sk-abc123}}\n"
            "aggregator: {model: m}",
            "must be the NAME of an environment variable",
        ),
        (
            "providers: {x: {base_url: http://h/v1}}\nproposers: [{model: a}]\nmin_ok: 2\n"
            "aggregator: {model: m}",
            "min_ok is 2 but the layer has only 1 agents",
        ),
        (
            "providers: {x: {base_url: http://h/v1}}\naggregator: {model: m}\n"
            "layers: [[{model: a}]]\n"
            "proposers: [{model: a}]",
            "not both",
        ),
        ("- just\n- a list", "the top level must be a mapping"),
        ("providers: {x: {base_url: http://h/v1}\naggregator: [", "not valid YAML at line"),
    ],
)
def test_a_bad_file_gets_one_line_naming_the_file_the_key_and_the_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    error = str(caught.value)
    assert error.startswith(f"{path}: ")
    assert message in error
    assert "\n" not in error


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_a_missing_key_fails_before_any_request_naming_the_variable(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    with pytest.raises(ConfigError, match="TOGETHER_API_KEY"):
        MoA.from_config(config, env=Environment({}))


def test_keys_can_come_from_a_named_env_file(tmp_path: Path) -> None:
    (tmp_path / "keys.env").write_text("TOGETHER_API_KEY=sk-from-dotenv-123\n")
    config = load_config(write(tmp_path, GOOD + "env_file: keys.env\n"))
    moa = MoA.from_config(config)
    assert moa.name == "moa"
    assert "sk-from-dotenv" not in repr(moa.providers)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_a_valid_config(name: str) -> None:
    config = preset_config(name)
    pipeline = config.resolve()
    assert pipeline.call_count >= 2


def test_the_local_preset_fixes_no_seed() -> None:
    # A fixed seed made "regenerate" in a chat UI return the same answer every time.
    config = preset_config("local")
    pipeline = config.resolve()
    agents = [a for layer in pipeline.layers for a in layer.agents] + [pipeline.aggregator]
    assert agents and all(agent.seed is None for agent in agents)


def test_paper_presets_match_the_paper() -> None:
    moa = preset_config("paper-moa").resolve()
    lite = preset_config("paper-moa-lite").resolve()
    assert moa.total_layers == 3 and lite.total_layers == 2
    assert len(moa.layers[0].agents) == 6
    assert moa.aggregator.model == "Qwen/Qwen1.5-110B-Chat"
    assert lite.aggregator.model == "Qwen/Qwen1.5-72B-Chat"
    assert {a.temperature for a in moa.layers[0].agents} == {0.7}


def test_an_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'nope'; choose one of: local"):
        preset_config("nope")


# Any YAML-ish document: a valid config or one ConfigError line, never another exception.
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=8)
)
_keys = st.sampled_from(
    [
        "providers",
        "proposers",
        "aggregator",
        "layers",
        "temperature",
        "max_tokens",
        "model",
        "provider",
        "base_url",
        "type",
        "api_key_env",
        "pipelines",
        "min_ok",
        "fallbacks",
        "x",
        "agents",
        "layer_timeout",
        "references_in",
        "llama-cpp",
        "http://h/v1",
        "timeout",
    ]
)
_documents = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(_keys, children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(_documents)
def test_fuzzed_documents_give_a_config_or_one_clear_error(data: Any) -> None:
    try:
        parse_config(data, source="fuzz.yaml")
    except ConfigError as error:
        message = str(error)
        assert message.startswith("fuzz.yaml: ") and "\n" not in message
        assert "Traceback" not in message


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=80))
def test_fuzzed_text_files_give_a_config_or_one_clear_error(
    tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as error:
        assert "\n" not in str(error)


def test_yaml_round_trip_of_a_preset_loads(tmp_path: Path) -> None:
    path = write(tmp_path, yaml.safe_dump(PRESETS["together"]))
    assert load_config(path).pipelines["moa"].layers == 3

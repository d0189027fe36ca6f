"""Hostile and broken input, as an attacker or a bad network makes it: each case is one clear
line (or a record that says what happened), never a traceback, a hang or a leaked key."""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moa import ConfigError, InvalidRequest, MoA, load_config, parse_config
from moa._secrets import check_key, clip, looks_like_key, redact, register_secret
from moa.env import Environment
from moa.errors import BudgetExceeded, ProviderStatusError
from moa.prompts import fence_token
from moa.testing import FakeOpenAIServer, Reply
from tests.conftest import MoAMaker

KEY = "sk-hard-8c1f0e5d2b7a4f69a3d1c0b9e8f7a6d5"
#: A truncated emoji, as JSON escapes it: json.loads makes a lone surrogate of it.
CUT_EMOJI = "a \\ud83d b"


def moa_cli(
    *args: str, stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "moa", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def keyed_config(tmp_path: Path, fake: FakeOpenAIServer, *, proposers: int = 2) -> Path:
    path = tmp_path / "keyed.yaml"
    agents = ", ".join(f"{{model: p{i}}}" for i in range(1, proposers + 1))
    path.write_text(
        f'providers: {{fake: {{base_url: "{fake.base_url}", api_key_env: MOA_TEST_KEY}}}}\n'
        f"proposers: [{agents}]\naggregator: {{model: agg}}\nmax_attempts: 1\n"
    )
    return path


def one_line(stderr: bytes) -> str:
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, stderr.decode()
    assert "Traceback" not in lines[0]
    return lines[0]


# --- 1. text that cannot be encoded -------------------------------------------------------


def test_a_lone_surrogate_is_one_clear_error_from_the_library(make_moa: MoAMaker) -> None:
    moa = make_moa(proposers=[{"model": "p"}], aggregator={"model": "agg"})
    with pytest.raises(InvalidRequest, match="lone UTF-16 surrogate U\\+D83D at character 3"):
        moa.run(json.loads(f'"{CUT_EMOJI}"'))
    # Hashing for the fence token never fails, whatever the text.
    assert len(fence_token([{"role": "user", "content": "\ud83d"}], ["\udcff"])) == 16


def test_non_utf8_bytes_on_argv_or_stdin_are_one_line_exit_2(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    config = keyed_config(tmp_path, fake)
    env = {"MOA_TEST_KEY": KEY}
    from_stdin = moa_cli("ask", "--config", str(config), "-", stdin=b"caf\xe9 ?", env=env)
    assert from_stdin.returncode == 2
    assert "a byte that is not UTF-8 (0xE9)" in one_line(from_stdin.stderr)
    from_argv = moa_cli("ask", "--config", str(config), os.fsdecode(b"caf\xe9"), env=env)
    assert from_argv.returncode == 2
    assert "not UTF-8" in one_line(from_argv.stderr)
    assert fake.requests == []


# --- 3. redact before clipping ------------------------------------------------------------


def test_a_key_after_a_long_error_message_never_leaks_in_part(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    config = keyed_config(tmp_path, fake)
    message = "x" * 471 + " " + KEY  # clipped at 500 characters: cuts through the key
    fake.script("p1", Reply(status=401, body=json.dumps({"error": {"message": message}})))
    fake.script("p2", Reply(status=401, body="y" * 190 + KEY))  # a plain-text body, cut at 200
    done = moa_cli("-v", "ask", "--json", "--config", str(config), "q", env={"MOA_TEST_KEY": KEY})
    assert done.returncode == 1
    output = (done.stdout + done.stderr).decode()
    assert "HTTP 401" in output
    for head in (KEY[:8], KEY[4:12]):
        assert head not in output


def test_clip_redacts_first_and_redact_drops_a_clipped_head() -> None:
    register_secret(KEY)
    assert KEY[:10] not in clip("z" * 95 + KEY, 100)
    assert redact("prefix " + KEY[:12] + "…") == "prefix ***…"
    assert redact("prefix " + KEY[:12]) == "prefix ***"
    assert redact("ordinary text") == "ordinary text"


# --- 4 and 5. keys checked when read, never echoed ----------------------------------------


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("sk-abc\ndef0123456789", "line break"),
        ("sk-abc def0123456789", "space"),
        ("sk-abcé0123456789", "not printable ASCII"),
    ],
)
def test_a_key_with_a_newline_space_or_non_ascii_names_the_variable_not_the_value(
    value: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Environment({"MY_KEY": value}).api_key("MY_KEY", "p")
    message = str(caught.value)
    assert "MY_KEY" in message and problem in message
    assert value not in message and "abc" not in message and "\n" not in message
    assert check_key(KEY) is None


def test_a_bad_key_in_the_cli_is_exit_2_without_the_key(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    config = keyed_config(tmp_path, fake)
    done = moa_cli("ask", "--config", str(config), "q", env={"MOA_TEST_KEY": "sk-a\nbcdef9876"})
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert "MOA_TEST_KEY" in line and "bcdef9876" not in line
    assert fake.requests == []


@pytest.mark.parametrize(
    "pasted",
    [
        "0123456789abcdef0123456789abcdef",
        "sk-proj-AbC123",
        "gsk_8f7e6d5c4b3a29181716",
        "AIzaSyD3xAmPlEkEy12345",
        "hf_ABCDEFGHIJKLMNOPQRSTUVWXyz",
        "QWxhZGRpbjpvcGVuIHNlc2FtZQ",
    ],
)
def test_a_key_pasted_into_api_key_env_is_refused_without_repeating_it(
    tmp_path: Path, pasted: str
) -> None:
    path = tmp_path / "moa.yaml"
    path.write_text(
        f"providers: {{x: {{base_url: http://h/v1, api_key_env: '{pasted}'}}}}\n"
        "layers: 1\naggregator: {model: m}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "looks like an API key" in message or "NAME of an environment variable" in message
    assert pasted not in message and pasted[:6] not in message


@pytest.mark.parametrize(
    "name",
    ["TOGETHER_API_KEY", "OPENAI_API_KEY", "GROQ_API_KEY", "MY_PROVIDER_KEY_2", "AZURE_OPENAI_KEY"],
)
def test_ordinary_variable_names_are_not_mistaken_for_keys(name: str) -> None:
    assert not looks_like_key(name)


# --- 2. the cloud-metadata guard checks the address, not its spelling ----------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/v1",
        "http://2852039166/v1",
        "http://0xA9FEA9FE/v1",
        "http://0251.0376.0251.0376/v1",
        "http://[::ffff:169.254.169.254]/v1",
        "http://[::ffff:a9fe:a9fe]/v1",
        "http://[64:ff9b::a9fe:a9fe]/v1",
        "http://169.254.43518/v1",
        "http://169.254.169.254.:80/v1",
        "http://metadata.google.internal./v1",
        "http://METADATA.google.internal/v1",
        "http://[fd00:ec2::254]/v1",
        "http://[fe80::1%25eth0]/v1",
        "http://100.100.100.200/v1",
    ],
)
def test_every_spelling_of_a_metadata_address_is_refused(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {"providers": {"x": {"base_url": url}}, "layers": 1, "aggregator": {"model": "m"}}
        )
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080/v1", "https://api.together.xyz/v1", "http://[::1]:9/v1", "http://h/v1"],
)
def test_ordinary_addresses_are_accepted(url: str) -> None:
    parse_config({"providers": {"x": {"base_url": url}}, "layers": 1, "aggregator": {"model": "m"}})


@pytest.mark.parametrize("host", ["999.1.1.1", "1.2.3.256", "api.0x1f"])
def test_a_host_ending_in_a_number_must_be_a_valid_address(host: str) -> None:
    """URL parsers read these as (broken) IPv4 addresses, so no request could ever go out."""
    with pytest.raises(ConfigError, match="neither a host name nor a valid IPv4 address"):
        parse_config(
            {
                "providers": {"x": {"base_url": f"http://{host}/v1"}},
                "layers": 1,
                "aggregator": {"model": "m"},
            }
        )


# --- 9. sibling failures leave no unretrieved task exception -------------------------------


def test_proposers_failing_together_leave_no_task_exception_never_retrieved(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    config = keyed_config(tmp_path, fake)
    config.write_text(config.read_text() + "max_total_tokens: 1\n")
    done = moa_cli("ask", "--config", str(config), "q", env={"MOA_TEST_KEY": KEY})
    assert done.returncode == 1
    assert "max_total_tokens=1 would be exceeded" in one_line(done.stderr)


def test_budget_failures_of_siblings_are_all_retrieved_in_process(
    make_moa: MoAMaker, caplog: pytest.LogCaptureFixture
) -> None:
    moa = make_moa(
        proposers=[{"model": "p1"}, {"model": "p2"}, {"model": "p3"}],
        aggregator={"model": "agg"},
        max_total_tokens=1,
    )
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        with pytest.raises(BudgetExceeded):
            moa.run("q")
        moa.close()
        gc.collect()
    assert "never retrieved" not in caplog.text


def test_provider_errors_redact_a_key_clipped_by_someone_else() -> None:
    key = Environment({"K": "sk-live-0123456789abcdefghij"}).api_key("K", "p")
    clipped = f"HTTP 401: {'m' * 40} {key}"[:60]
    error = ProviderStatusError(clipped, status_code=401, body=clipped)
    assert key[:8] not in str(error) and key[:8] not in (error.body or "")


def test_moa_keeps_working_after_a_refused_prompt(make_moa: MoAMaker) -> None:
    moa: MoA = make_moa(proposers=[{"model": "p"}], aggregator={"model": "agg"})
    with pytest.raises(InvalidRequest):
        moa.run("\udcff")
    assert moa.run("fine").output == "agg answer 0"

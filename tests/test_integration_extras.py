"""The integrations' extras: each missing one is named with its install command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moa.testing import FakeOpenAIServer


@pytest.mark.parametrize(
    ("hidden", "module", "extra"),
    [
        ("mcp", "moa.mcp_server", "mcp"),
        ("prometheus_client", "moa.server.metrics", "metrics"),
    ],
)
def test_a_missing_integration_extra_names_the_install_command(
    hidden: str, module: str, extra: str
) -> None:
    code = (
        f"import sys; sys.modules[{hidden!r}] = None\n"
        "try:\n"
        f"    import {module}\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert f"pip install 'mixture-of-agents[{extra}]'" in done.stdout, done.stderr


def _moa_without(hidden: str, *args: str, env: dict[str, str] | None = None) -> str:
    import os

    code = f"import sys; sys.modules[{hidden!r}] = None\nfrom moa.cli import main\nmain()\n"
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )
    return f"{done.returncode}\n{done.stdout}{done.stderr}"


def test_moa_mcp_and_serve_metrics_without_their_extras_say_what_to_install() -> None:
    out = _moa_without("mcp", "mcp")
    assert out.startswith("2\n")
    assert "error: moa mcp needs the 'mcp' package" in out
    assert "pip install 'mixture-of-agents[mcp]'" in out
    out = _moa_without("prometheus_client", "serve", "--metrics")
    assert out.startswith("2\n")
    assert "pip install 'mixture-of-agents[metrics]'" in out


def test_otel_variables_without_the_sdk_warn_and_the_command_still_answers(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    config = tmp_path / "moa.yaml"
    config.write_text(
        f"providers: {{fake: {{base_url: '{fake.base_url}'}}}}\n"
        "proposers: [{model: p1}]\naggregator: {model: agg}\n"
    )
    out = _moa_without(
        "opentelemetry", "ask", "--config", str(config), "hi", env={"OTEL_TRACES_EXPORTER": "otlp"}
    )
    assert out.startswith("0\nagg answer 0\n")
    assert "warning: OTEL_TRACES_EXPORTER (tracing) needs the 'opentelemetry-sdk' package" in out
    assert "pip install 'mixture-of-agents[otel]'" in out

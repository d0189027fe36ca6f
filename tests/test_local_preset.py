"""The `local` preset as tuned on benchmarks/quality.py, and what `make run` prints with it."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from moa import MoA, parse_config
from moa.presets import PRESETS, preset_config

#: The question `make run` asks (Makefile PROMPT).
MAKE_RUN_PROMPT = "In one sentence: why is it useful to ask several people the same question?"


def _repeats(text: str, span: int = 20, times: int = 3) -> bool:
    """Whether some span of `span` characters occurs `times` times or more: a loop."""
    flat = " ".join(text.split())
    return any(
        flat.count(flat[i : i + span]) >= times for i in range(0, max(0, len(flat) - span), 5)
    )


def test_the_local_preset_chooses_among_seven_answers_without_a_call() -> None:
    config = preset_config("local")
    pipeline = config.resolve()
    agents = pipeline.layers[0].agents
    assert len(pipeline.layers) == 1 and len(agents) == 7
    assert pipeline.aggregation.strategy == "confidence"
    assert pipeline.aggregation.agreement_weight == 10
    # One greedy answer, six samples; none seeded, so every request samples afresh.
    assert [a.temperature for a in agents].count(0.0) == 1
    assert all(a.seed is None for a in agents)
    # No system prompt ("Answer briefly." measured worse), and short answers.
    assert all(a.system is None and a.max_tokens <= 128 for a in agents)


def test_the_repeat_detector_sees_a_loop() -> None:
    loop = "It is a mix of answers that combine. " * 4
    assert _repeats(loop)
    assert not _repeats("Several models answer; the most confident answer is kept. It is short.")


@pytest.mark.model
def test_make_run_prints_a_short_answer_without_a_loop() -> None:
    """The preset on `make run`'s own question, seeded here so the run is reproducible."""
    data: dict[str, Any] = copy.deepcopy(PRESETS["local"])
    for offset, agent in enumerate(data["proposers"]):
        if agent.get("temperature", 0.7) > 0:
            agent["seed"] = 1000 + offset
    data["providers"]["local"]["n_ctx"] = 1024
    with MoA.from_config(parse_config(data)) as moa:
        result = moa.run(MAKE_RUN_PROMPT)
    output = result.output.strip()
    assert output and re.search(r"[A-Za-z]{3}", output)
    assert not _repeats(output), output
    assert result.aggregator.usage.total_tokens == 0  # confidence chooses without a call
    assert len(output) < 800

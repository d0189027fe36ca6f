"""Aggregation strategies over real HTTP to the fake server: select, vote, confidence, window."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from moa import Done, TextDelta
from moa.config import AggregationSettings
from moa.results import AgentResult, TokenLogprob
from moa.strategies import (
    agreement,
    certainty,
    choose_by_confidence,
    extract_answer,
    parse_selection,
    vote,
    window_chunks,
)
from moa.testing import FakeOpenAIServer, Reply
from tests.conftest import ConfigMaker, MoAMaker, agents, closed_after_test

QUESTION = "What is 17 + 25?"


def candidate(index: int, text: str, **fields: Any) -> AgentResult:
    return AgentResult(
        layer=1, index=index, provider="fake", model="m", status="ok", output=text, **fields
    )


# --- vote ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("42", "42"),
        ("The answer is 42.", "42"),
        ("17 + 25 = 42", "42"),
        ("Let me add.\n17 + 25 makes 42", "42"),
        ("Answer: 1,234", "1234"),
        ("It costs $1,234.50 in total.", "1234.5"),
        ("3.0", "3"),
        ("about 15%", "15"),
        ("The final answer is **-7**.", "-7"),
        ("Three", "3"),
        ("three apples", "3"),
        ("Paris.", "paris"),
        ("The answer is: The Paris", "paris"),
        ("PARIS!", "paris"),
        ("Thinking...\n\nMount Everest", "mount everest"),
        ("The capital is Rome.\nAnswer: Paris", "paris"),
        ("", ""),
        ("   \n  ", ""),
    ],
)
def test_vote_extracts_and_normalises_final_answers(text: str, answer: str) -> None:
    assert extract_answer(text) == answer


def test_vote_picks_the_most_frequent_answer_and_keeps_its_first_text_verbatim() -> None:
    candidates = [
        candidate(0, "It is 41."),
        candidate(1, "17 + 25 = 42"),
        candidate(2, "The answer is 42."),
        candidate(3, "41"),
        candidate(4, "forty-two? no: 42"),
    ]
    result = vote(candidates)
    assert result.chosen == 1
    assert result.counts == {"41": 2, "42": 3}
    assert [s.answer for s in result.scores] == ["41", "42", "42", "41", "42"]


def test_a_vote_tie_goes_to_the_earliest_agent() -> None:
    candidates = [
        candidate(0, "Rome"),
        candidate(1, "Paris"),
        candidate(2, "paris"),
        candidate(3, "rome."),
    ]
    assert vote(candidates).chosen == 0
    assert vote(candidates[1:]).chosen == 1


def test_vote_over_answers_with_nothing_to_extract_takes_the_earliest() -> None:
    assert vote([candidate(2, "..."), candidate(5, "!")]).chosen == 2


def test_vote_runs_no_model_call_and_streams_the_chosen_text(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    for model, text in (("p1", "The sum is 41."), ("p2", "17 + 25 = 42"), ("p3", "Answer: 42")):
        fake.script(model, Reply(text=text))
    moa = make_moa(
        proposers=agents("p1", "p2", "p3"), aggregator={"model": "agg", "strategy": "vote"}
    )
    events = list(_events(moa, QUESTION))
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["17 + 25 = 42"]
    result = events[-1].result
    assert not fake.requests_for("agg")
    assert result.output == "17 + 25 = 42"
    assert result.aggregator_attempts == ()
    assert result.aggregator.attempts == 0
    data = result.to_dict()["aggregation"]
    assert data["strategy"] == "vote"
    assert data["chosen"] == 1
    assert data["counts"] == {"41": 1, "42": 2}


# --- select --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "count", "number"),
    [
        ("2", 3, 2),
        ("Candidate 3.", 3, 3),
        ("The best is 1 because 2 is wrong", 3, 1),
        ("4", 3, None),
        ("0", 3, None),
        ("Paris is the capital of France.", 3, None),
        ("", 3, None),
    ],
)
def test_parse_selection(reply: str, count: int, number: int | None) -> None:
    assert parse_selection(reply, count) == number


def _three_candidates(fake: FakeOpenAIServer) -> None:
    fake.script("p1", Reply(text="It is 41."))
    fake.script("p2", Reply(text="17 + 25 = 42"))
    fake.script("p3", Reply(text="Surely 42"))


def test_select_returns_the_named_candidate_verbatim(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    _three_candidates(fake)
    fake.script("agg", Reply(text="Candidate 3"))
    moa = make_moa(
        proposers=agents("p1", "p2", "p3"),
        aggregator={"model": "agg", "strategy": "select", "max_tokens": 500},
    )
    result = moa.run(QUESTION)
    assert result.output == "Surely 42"
    (request,) = fake.requests_for("agg")
    # The numbered candidates and the instruction to answer with a number; a short reply.
    system = request.messages[0]["content"]
    assert "number of the best candidate" in system
    assert re.search(r"candidate 1 \w+>>>\nIt is 41\.", system)
    assert request.body["max_tokens"] == 32
    assert result.aggregation.to_dict() == {"strategy": "select", "chosen": 2}
    assert result.aggregator.output == "Candidate 3"
    assert result.usage.total_tokens > 0


@pytest.mark.parametrize("reply", ["7", "I would rather write my own answer: 17+25 is 42."])
def test_select_with_an_out_of_range_or_garbage_reply_falls_back_to_vote(
    fake: FakeOpenAIServer, make_moa: MoAMaker, reply: str
) -> None:
    _three_candidates(fake)
    fake.script("agg", Reply(text=reply))
    moa = make_moa(
        proposers=agents("p1", "p2", "p3"), aggregator={"model": "agg", "strategy": "select"}
    )
    result = moa.run(QUESTION)
    # 42 has two votes; the earliest of them is p2's.
    assert result.output == "17 + 25 = 42"
    aggregation = result.aggregation.to_dict()
    assert aggregation["chosen"] == 1
    assert "names no candidate" in aggregation["note"] and "vote" in aggregation["note"]


def test_select_whose_call_fails_falls_back_to_vote(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    _three_candidates(fake)
    fake.script("agg", Reply(status=500))
    moa = make_moa(
        proposers=agents("p1", "p2", "p3"),
        aggregator={"model": "agg", "strategy": "select"},
        max_attempts=1,
    )
    result = moa.run(QUESTION)
    assert result.ok and result.output == "17 + 25 = 42"
    assert "aggregator failed" in (result.aggregation.note or "")


# --- window (Self-MoA-Seq) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "window", "chunks"),
    [
        (3, 3, [[0, 1, 2]]),
        (2, 3, [[0, 1]]),
        (5, 3, [[0, 1, 2], [3, 4]]),
        (6, 3, [[0, 1, 2], [3, 4], [5]]),
        (7, 2, [[0, 1], [2], [3], [4], [5], [6]]),
    ],
)
def test_window_chunks(count: int, window: int, chunks: list[list[int]]) -> None:
    assert [list(c) for c in window_chunks(count, window)] == chunks


def test_window_synthesizes_n_references_at_a_time_carrying_the_running_answer(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    fake.respond("agg", lambda body, n: Reply(text=f"running {n}"))
    moa = make_moa(
        proposers=agents(*(f"p{i}" for i in range(1, 7))),
        aggregator={"model": "agg", "window": 3},
    )
    events = list(_events(moa, QUESTION))
    result = events[-1].result
    calls = fake.requests_for("agg")
    shown = [_candidates(r.messages[0]["content"]) for r in calls]
    assert shown == [
        ["p1 answer 0", "p2 answer 0", "p3 answer 0"],
        ["running 0", "p4 answer 0", "p5 answer 0"],
        ["running 1", "p6 answer 0"],
    ]
    assert [r.stream for r in calls] == [False, False, True]  # only the last step streams
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "running 2"
    assert result.output == "running 2"
    assert len(result.aggregator_attempts) == 3
    assert result.aggregation.to_dict() == {"strategy": "synthesize", "steps": 3}


def test_a_window_as_large_as_the_layer_is_one_ordinary_call(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    moa = make_moa(proposers=agents("p1", "p2"), aggregator={"model": "agg", "window": 4})
    result = moa.run(QUESTION)
    assert len(fake.requests_for("agg")) == 1
    assert result.aggregation.steps == 1


def test_default_strategy_is_recorded_as_synthesize(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    result = make_moa(proposers=agents("p1"), aggregator={"model": "agg"}).run(QUESTION)
    assert result.to_dict()["aggregation"] == {"strategy": "synthesize"}


# --- confidence ----------------------------------------------------------------------------


def by_sample(fake: FakeOpenAIServer, *replies: Reply) -> None:
    """Answer model m's samples by their seed (0, 1, 2, …): they run concurrently, so the order
    their requests arrive in is not theirs."""
    fake.respond("m", lambda body, n: replies[body["seed"]])


def test_confidence_picks_the_candidate_its_model_was_surest_of(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    by_sample(
        fake,
        Reply(text="It is 41.", logprob=-1.2),
        Reply(text="17 + 25 = 42", logprob=-0.05),
        Reply(text="42, I think", logprob=-0.7),
    )
    moa = make_moa(
        proposers=[{"model": "m", "samples": 3, "seed": 0}],
        aggregator={"model": "agg", "strategy": "confidence"},
    )
    result = moa.run(QUESTION)
    assert not fake.requests_for("agg")
    for request in fake.requests_for("m"):
        assert request.body["logprobs"] is True and request.body["top_logprobs"] == 5
    assert result.output == "17 + 25 = 42"
    data = result.to_dict()["aggregation"]
    assert data["strategy"] == "confidence" and data["chosen"] == 1 and "note" not in data
    scores = {s["index"]: s for s in data["scores"]}
    assert scores[1]["mean_logprob"] == pytest.approx(-0.05)
    assert scores[0]["mean_logprob"] == pytest.approx(-1.2)
    # Both measures are recorded whichever decides, so a benchmark can compare them.
    assert scores[1]["certainty"] > scores[2]["certainty"] > scores[0]["certainty"]
    assert set(scores[0]) >= {"agreement", "score"}


def test_confidence_measure_certainty_and_agreement_weight_change_the_choice(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    by_sample(
        fake,
        Reply(text="The sum is 41", logprob=-0.1),
        Reply(text="The sum is 42", logprob=-0.3),
        Reply(text="The sum is 42", logprob=-0.4),
    )

    def run(**aggregator: Any) -> int | None:
        moa = make_moa(
            proposers=[{"model": "m", "samples": 3, "seed": 0}],
            aggregator={"model": "agg", "strategy": "confidence", **aggregator},
        )
        return moa.run(QUESTION).aggregation.chosen

    assert run() == 0
    assert run(measure="certainty", top_logprobs=3) == 0
    assert run(agreement_weight=10) == 1


def test_confidence_falls_back_to_agreement_when_the_provider_returns_no_logprobs(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    # No scripted logprob: the fake answers "logprobs": null, as a server without them would.
    fake.script("m", Reply(text="It is 41."))
    fake.script("m", Reply(text="The sum is 42."))
    fake.script("m", Reply(text="The sum is 42, surely."))
    moa = make_moa(
        proposers=[{"model": "m", "samples": 3}],
        aggregator={"model": "agg", "strategy": "confidence"},
    )
    result = moa.run(QUESTION)
    assert result.ok
    assert result.output == "The sum is 42."
    note = result.aggregation.note or ""
    assert "no log-probabilities" in note and "agreement alone" in note
    assert all(s.mean_logprob is None for s in result.aggregation.scores)


def test_confidence_asks_again_without_logprobs_when_a_server_refuses_them(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    def refuse(body: dict[str, Any], n: int) -> Reply:
        if body.get("logprobs"):
            return Reply(status=400, body='{"error": {"message": "logprobs is not supported"}}')
        return Reply(text=f"answer {n}")

    fake.respond("m", refuse)
    moa = make_moa(
        proposers=[{"model": "m", "samples": 2}],
        aggregator={"model": "agg", "strategy": "confidence"},
    )
    result = moa.run(QUESTION)
    assert result.ok and result.output.startswith("answer ")
    assert "agreement alone" in (result.aggregation.note or "")
    asked = sorted(bool(r.body.get("logprobs")) for r in fake.requests_for("m"))
    assert asked == [False, False, True, True]


@pytest.mark.parametrize("streamed", [False, True])
def test_the_openai_provider_parses_logprobs_streamed_and_not(
    fake: FakeOpenAIServer, streamed: bool
) -> None:
    import asyncio

    from moa.providers.base import ChatRequest
    from moa.providers.openai_compat import OpenAICompatibleProvider

    fake.chunk_size = 4
    fake.script("m", Reply(text="Paris, France", logprob=-0.25), Reply(text="Rome"))
    provider = OpenAICompatibleProvider("fake", base_url=fake.base_url)
    request = ChatRequest(
        model="m", messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=2
    )

    async def ask() -> list[Any]:
        answers = []
        for _ in range(2):
            if streamed:
                chunks = [c async for c in provider.stream(request)]
                tokens = [t for c in chunks if c.logprobs for t in c.logprobs]
                answers.append(tokens if any(c.logprobs is not None for c in chunks) else None)
            else:
                completion = await provider.complete(request)
                answers.append(None if completion.logprobs is None else list(completion.logprobs))
        await provider.aclose()
        return answers

    try:
        scripted, missing = asyncio.run(ask())
    finally:
        fake.chunk_size = 8
    assert [t.token for t in scripted] == ["Pari", "s, F", "ranc", "e"]
    assert all(t.logprob == -0.25 for t in scripted)
    assert [token for token, _ in scripted[0].top] == ["Pari", "<alt1>"]
    assert missing is None  # a server that sends none: detected, not an error
    assert fake.requests[0].body["logprobs"] is True
    assert fake.requests[0].body["top_logprobs"] == 2


def test_malformed_logprobs_count_as_none() -> None:
    from moa.providers.openai_compat import _logprobs

    assert _logprobs(None) is None
    assert _logprobs({"content": None}) is None
    assert _logprobs({"content": [{"token": "x"}]}) is None
    assert _logprobs({"content": ["x"]}) is None
    assert _logprobs({"content": []}) == ()


def test_mixed_models_are_compared_by_agreement_unless_each_has_several_candidates() -> None:
    settings = AggregationSettings(strategy="confidence")
    sure = (TokenLogprob("a", -0.01),)
    unsure = (TokenLogprob("a", -2.0),)

    def make(index: int, model: str, text: str, logprobs: tuple[TokenLogprob, ...]) -> AgentResult:
        return AgentResult(
            layer=1,
            index=index,
            provider="fake",
            model=model,
            status="ok",
            output=text,
            logprobs=logprobs,
        )

    single = [
        make(0, "big", "Rome", sure),
        make(1, "small", "Paris", unsure),
        make(2, "small", "Paris", unsure),
    ]
    chosen = choose_by_confidence(single, settings)
    assert chosen.chosen == 1 and "different models" in (chosen.note or "")
    # Two per model: each model's scores are normalised among its own candidates.
    paired = [
        make(0, "big", "Rome", sure),
        make(1, "big", "Rome", (TokenLogprob("a", -0.02),)),
        make(2, "small", "Paris", unsure),
        make(3, "small", "Paris", (TokenLogprob("a", -0.5),)),
    ]
    result = choose_by_confidence(paired, settings)
    assert result.note is None
    assert [s.score for s in result.scores] == pytest.approx([1.0, -1.0, -1.0, 1.0])
    assert result.chosen == 0  # a tie on the normalised score: the earliest agent


def test_certainty_and_agreement_measures() -> None:
    even = TokenLogprob("a", -0.693, (("a", -0.693), ("b", -0.693)))
    peaked = TokenLogprob("a", -0.01, (("a", -0.01), ("b", -4.6)))
    assert certainty([even]) == pytest.approx(0.0, abs=1e-9)
    assert (certainty([peaked]) or 0.0) > 1.0
    assert certainty([TokenLogprob("a", -0.1)]) is None
    # F1: "the sum is 42"–"sum 42" 2/3, "the sum is 42"–"it is 41" 2/7, "sum 42"–"it is 41" 0.
    assert agreement(["the sum is 42", "sum 42", "it is 41"]) == pytest.approx(
        [(2 / 3 + 2 / 7) / 2, (2 / 3) / 2, (2 / 7) / 2]
    )
    assert agreement(["a b", "a b"]) == [1.0, 1.0]
    assert agreement(["only"]) == [0.0]


# --- config and surfaces -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("aggregator", "fragment"),
    [
        ({"strategy": "rewrite"}, "strategy"),
        ({"strategy": "vote", "window": 3}, "window"),
        ({"window": 1}, "window"),
        ({"strategy": "vote", "measure": "certainty"}, "measure"),
        ({"agreement_weight": 1}, "agreement_weight"),
    ],
)
def test_bad_strategy_settings_are_one_clear_config_error(
    make_config: ConfigMaker, aggregator: dict[str, Any], fragment: str
) -> None:
    from moa.errors import ConfigError

    with pytest.raises(ConfigError, match=fragment) as caught:
        make_config(proposers=agents("p1"), aggregator={"model": "agg", **aggregator})
    assert "\n" not in str(caught.value)


def test_a_choosing_strategy_needs_proposers(make_config: ConfigMaker) -> None:
    from moa.errors import ConfigError

    with pytest.raises(ConfigError, match="needs proposers"):
        make_config(aggregator={"model": "agg", "strategy": "vote"}, layers=1)


def test_the_strategy_reaches_ask_json_and_batch_records(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from click.testing import CliRunner

    from moa.cli import cli

    fake.respond("p1", lambda body, n: Reply(text="Answer: 42"))
    fake.respond("p2", lambda body, n: Reply(text="41"))
    fake.respond("p3", lambda body, n: Reply(text="It is 42."))
    config = tmp_path / "moa.json"
    config.write_text(
        json.dumps(
            {
                "providers": {"fake": {"base_url": fake.base_url}},
                "proposers": agents("p1", "p2", "p3"),
                "aggregator": {"model": "agg", "strategy": "vote"},
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "moa", "ask", "--config", str(config), "--json", QUESTION],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["output"] == "Answer: 42"
    assert data["aggregation"] == {
        "strategy": "vote",
        "chosen": 0,
        "counts": {"42": 2, "41": 1},
        "scores": [
            {"index": 0, "answer": "42"},
            {"index": 1, "answer": "41"},
            {"index": 2, "answer": "42"},
        ],
    }

    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"instruction": QUESTION}) + "\n")
    out = tmp_path / "out.jsonl"
    invoked = CliRunner().invoke(
        cli, ["batch", str(rows), "--config", str(config), "-o", str(out), "--no-cache"]
    )
    assert invoked.exit_code == 0, invoked.output
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["output"] == "Answer: 42"
    assert record["runs"][0]["aggregation"]["strategy"] == "vote"
    assert record["runs"][0]["aggregation"]["chosen"] == 0


def test_the_strategy_reaches_the_servers_moa_object(
    fake: FakeOpenAIServer, make_config: ConfigMaker
) -> None:
    import openai

    from moa.engine import open_pipelines
    from moa.server import BackgroundServer, create_app

    fake.respond("p1", lambda body, n: Reply(text="Paris"))
    fake.respond("p2", lambda body, n: Reply(text="The answer is Paris."))
    config = make_config(
        proposers=agents("p1", "p2"), aggregator={"model": "agg", "strategy": "vote"}
    )
    with BackgroundServer(create_app(open_pipelines(config))) as server:
        client = closed_after_test(
            openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        )
        completion = client.chat.completions.create(
            model="moa", messages=[{"role": "user", "content": "Capital of France?"}]
        )
    assert completion.choices[0].message.content == "Paris"
    extension = completion.model_extra["moa"]  # type: ignore[index]
    assert extension["aggregation"]["strategy"] == "vote"
    assert extension["aggregation"]["counts"] == {"paris": 2}


def _events(moa, prompt: str):  # type: ignore[no-untyped-def]
    import asyncio

    async def collect() -> list[Any]:
        return [event async for event in moa.stream(prompt)]

    events = asyncio.run(collect())
    assert isinstance(events[-1], Done)
    return events


def _candidates(system: str) -> list[str]:
    return re.findall(r"<<<candidate \d+ \w+>>>\n(.*?)\n<<<end of candidate", system, re.S)

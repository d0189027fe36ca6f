"""Straggler cut-off: a layer with its answers in stops waiting for a hung agent."""

from __future__ import annotations

import time

import pytest

from moa import ConfigError, parse_config
from moa.straggler import Cutoff, StragglerWatch
from moa.testing import FakeOpenAIServer, Reply
from tests.conftest import MoAMaker, agents

Q = "List three uses of copper."


def test_a_hung_proposer_is_cut_off_soon_after_the_others_with_its_own_status(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    fake.script("hung", Reply(hang=60))
    # The case from the issue: with timeout 3 s and 4 attempts it used to cost over 15 s.
    moa = make_moa(
        proposers=[*agents("p1", "p2", "p3", "p4"), {"model": "hung"}],
        aggregator={"model": "agg"},
        timeout=3,
        max_attempts=4,
    )
    result = moa.run(Q)
    statuses = [a.status for a in result.layers[0].agents]
    assert statuses == ["ok", "ok", "ok", "ok", "cancelled"]
    hung = result.layers[0].agents[4]
    assert "straggler" in (hung.error or "") and "wait: all" in (hung.error or "")
    assert hung.latency_s < 3  # cut before its first 3 s timeout, let alone four of them
    assert len(fake.requests_for("hung")) == 1  # cut, not retried
    (request,) = fake.requests_for("hung")
    deadline = time.monotonic() + 2
    while not request.disconnected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert request.disconnected
    assert "hung" not in fake.requests_for("agg")[0].text


def test_normal_spread_cuts_no_one(fake: FakeOpenAIServer, make_moa: MoAMaker) -> None:
    for model, latency in (("p1", 0.05), ("p2", 0.2), ("p3", 0.4), ("p4", 0.9)):
        fake.script(model, Reply(latency=latency))
    moa = make_moa(proposers=agents("p1", "p2", "p3", "p4"), aggregator={"model": "agg"})
    result = moa.run(Q)
    assert all(a.status == "ok" for a in result.layers[0].agents)


def test_wait_all_waits_for_the_slow_agent_and_a_layer_may_say_so_alone(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    def slow_run(**pipeline: object) -> list[str]:
        fake.reset()
        fake.script("slow", Reply(latency=2.0))
        moa = make_moa(aggregator={"model": "agg"}, **pipeline)
        return [a.status for layer in moa.run(Q).layers for a in layer.agents]

    layer = [*agents("p1", "p2"), {"model": "slow"}]
    assert slow_run(layers=[layer]) == ["ok", "ok", "cancelled"]
    assert slow_run(layers=[layer], wait="all") == ["ok", "ok", "ok"]
    assert slow_run(layers=[{"agents": layer, "wait": "all"}], wait="cutoff") == ["ok"] * 3
    # A floor longer than the delay keeps the slow agent, too.
    assert slow_run(layers=[layer], straggler_floor=5) == ["ok", "ok", "ok"]


def test_the_cut_off_waits_for_half_the_layer_and_min_ok() -> None:
    watch = StragglerWatch(Cutoff(factor=1.5, floor=1.0), agents=4, min_ok=1, started=100.0)
    watch.answered(0, 100.2)
    assert watch.deadline([2, 3]) is None  # one answer of four: too few to judge the others by
    watch.answered(1, 100.4)
    assert watch.deadline([2, 3]) == pytest.approx(100.0 + 0.3 + 1.0)
    watch.answered(2, 103.0)  # a late healthy answer moves the median, and the cut-off, out
    assert watch.deadline([3]) == pytest.approx(100.0 + 0.4 + 1.0)
    assert watch.due([3], 101.3) == [] and watch.due([3], 101.5) == [3]
    strict = StragglerWatch(Cutoff(), agents=4, min_ok=3, started=0.0)
    strict.answered(0, 1.0)
    strict.answered(1, 1.0)
    assert strict.deadline([2, 3]) is None
    off = StragglerWatch(None, agents=2, min_ok=1, started=0.0)
    off.answered(0, 1.0)
    assert off.deadline([1]) is None and not off.watches(1)
    exempt = StragglerWatch(Cutoff(), agents=2, min_ok=1, started=0.0, exempt=frozenset({1}))
    exempt.answered(0, 1.0)
    assert exempt.deadline([1]) is None and not exempt.watches(1)


def test_silence_is_judged_by_time_to_first_token_and_writing_by_answer_time() -> None:
    now = [0.0]
    watch = StragglerWatch(Cutoff(factor=1.5, floor=1.0), 4, 1, 0.0, clock=lambda: now[0])
    listened = [watch.listen(i, None) for i in range(4)]
    now[0] = 0.2
    listened[0]("The")
    listened[1]("Copper")
    now[0] = 0.6
    listened[2]("Wires")  # agent 2 writes; agent 3 never says a word
    now[0] = 8.0
    watch.answered(0, 8.0)
    assert watch.deadline([1, 2, 3]) is None
    now[0] = 9.0
    watch.answered(1, 9.0)
    # Agent 3 is silent where the answers had their first token within 0.2 s: cut at once.
    assert watch.cut_at(3) == pytest.approx(0.2 + 1.0)
    assert watch.due([2, 3], 9.0) == [3]
    assert "no first token after 9.0 s" in watch.reason(3, 9.0)
    # Agent 2 is writing: it is slow, not hung, and gets the answer-time grace.
    assert watch.cut_at(2) == pytest.approx(1.5 * 8.5)
    assert "no answer after 13.0 s" in watch.reason(2, 13.0)


def test_a_silent_proposer_is_cut_when_enough_answers_are_in_while_a_slow_writer_finishes(
    fake: FakeOpenAIServer, make_moa: MoAMaker
) -> None:
    # The fake server sends 8 characters a chunk, here one chunk every 0.1 s.
    fake.script("p1", Reply(text=" ".join(["copper"] * 6), chunk_delay=0.1))  # about 0.5 s
    fake.script("p2", Reply(text=" ".join(["copper"] * 6), chunk_delay=0.1))
    fake.script("writer", Reply(text=" ".join(["copper"] * 17), chunk_delay=0.1))  # 1.5 s
    fake.script("hung", Reply(hang=60))
    moa = make_moa(
        proposers=[*agents("p1", "p2"), {"model": "writer"}, {"model": "hung"}],
        aggregator={"model": "agg"},
        straggler_floor=2,
    )
    result = moa.run(Q)
    p1, p2, writer, hung = result.layers[0].agents
    assert [p1.status, p2.status, writer.status, hung.status] == ["ok", "ok", "ok", "cancelled"]
    assert "no first token" in (hung.error or "")
    assert all(r.stream for r in fake.requests if r.model != "agg")  # so that silence shows


def test_agents_on_the_embedded_model_are_never_cut(fake: FakeOpenAIServer) -> None:
    config = parse_config(
        {
            "providers": {"fake": {"base_url": fake.base_url}, "local": {"type": "llama-cpp"}},
            "proposers": [{"provider": "fake", "model": "p1"}, {"provider": "local"}],
            "aggregator": {"provider": "fake", "model": "agg"},
        }
    )
    assert config.resolve().layers[0].uncut == {1}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"wait": "some"}, "wait: Input should be 'cutoff' or 'all'"),
        ({"straggler_factor": 0.5}, "straggler_factor: Input should be greater than or equal to 1"),
        ({"straggler_floor": -1}, "straggler_floor: Input should be greater than or equal to 0"),
    ],
)
def test_bad_straggler_settings_are_one_clear_line(
    settings: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"proposers": [{"model": "p"}], "aggregator": {"model": "a"}, **settings})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)

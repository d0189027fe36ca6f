"""Straggler cut-off: a layer with its answers in stops waiting for a hung agent."""

from __future__ import annotations

import time

import pytest

from moa import ConfigError, parse_config
from moa.straggler import Cutoff, StragglerWatch
from moa.testing import FakeOpenAIServer, Reply
from tests.conftest import agents

Q = "List three uses of copper."


def test_a_hung_proposer_is_cut_off_soon_after_the_others_with_its_own_status(
    fake: FakeOpenAIServer, make_moa
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


def test_normal_spread_cuts_no_one(fake: FakeOpenAIServer, make_moa) -> None:
    for model, latency in (("p1", 0.05), ("p2", 0.2), ("p3", 0.4), ("p4", 0.9)):
        fake.script(model, Reply(latency=latency))
    moa = make_moa(proposers=agents("p1", "p2", "p3", "p4"), aggregator={"model": "agg"})
    result = moa.run(Q)
    assert all(a.status == "ok" for a in result.layers[0].agents)


def test_wait_all_waits_for_the_slow_agent_and_a_layer_may_say_so_alone(
    fake: FakeOpenAIServer, make_moa
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
    watch.answered(100.2)
    assert watch.deadline() is None  # one answer of four: too few to judge the others by
    watch.answered(100.4)
    assert watch.deadline() == pytest.approx(100.0 + 0.3 + 1.0)
    watch.answered(103.0)  # a late healthy answer moves the median, and the cut-off, out
    assert watch.deadline() == pytest.approx(100.0 + 0.4 + 1.0)
    strict = StragglerWatch(Cutoff(), agents=4, min_ok=3, started=0.0)
    strict.answered(1.0)
    strict.answered(1.0)
    assert strict.deadline() is None
    off = StragglerWatch(None, agents=2, min_ok=1, started=0.0)
    off.answered(1.0)
    assert off.deadline() is None


def test_agents_on_the_embedded_model_are_never_cut(fake: FakeOpenAIServer) -> None:
    from moa import MoA

    config = parse_config(
        {
            "providers": {"fake": {"base_url": fake.base_url}, "local": {"type": "llama-cpp"}},
            "proposers": [{"provider": "fake", "model": "p1"}, {"provider": "local"}],
            "aggregator": {"provider": "fake", "model": "agg"},
        }
    )
    moa = MoA.from_config(config)
    try:
        assert moa._uncuttable(moa.pipeline.layers[0]) == {1}
    finally:
        moa.close()


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

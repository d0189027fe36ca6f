from moa.testing import FakeOpenAIServer
from tests.conftest import agents


def test_three_layer_run_makes_n_times_l_minus_1_plus_1_calls(
    fake: FakeOpenAIServer, make_moa
) -> None:
    moa = make_moa(proposers=agents("p1", "p2", "p3"), aggregator={"model": "agg"}, layers=3)
    result = moa.run("What is 2+2?")
    assert len(fake.requests) == 3 * 2 + 1
    assert result.output == "agg answer 0"

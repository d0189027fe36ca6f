"""The one progress display: `moa batch`'s bar and `moa eval`'s judge-call bar are the same bar
on a terminal; elsewhere the batch writes plain lines and the evaluation writes nothing."""

from __future__ import annotations

import io

from moa.batch.progress import BatchStats, CountBar, TerminalProgress, make_progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_judging_bar_counts_calls_on_a_terminal_and_is_silent_elsewhere() -> None:
    terminal = FakeTerminal()
    with CountBar("judging", terminal) as bar:
        bar.started(4)
        bar.done(3)
    shown = terminal.getvalue()
    assert "judging" in shown and "3/4" in shown

    log = io.StringIO()
    with CountBar("judging", log) as bar:
        bar.started(4)
        bar.done(4)
    assert log.getvalue() == ""


def test_the_batch_bar_is_the_same_bar_with_its_counters_after_it() -> None:
    terminal = FakeTerminal()
    view = make_progress(terminal)
    assert isinstance(view, TerminalProgress)
    stats = BatchStats(total=5, skipped=1)
    view.start(stats)
    stats.succeeded, stats.failed = 2, 1
    view.update(stats)
    view.finish(stats)
    shown = terminal.getvalue()
    assert "batch" in shown and "4/5" in shown and "1 failed" in shown

"""Live per-agent status on stderr while the proposer layers run (only when it is a terminal)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from moa.results import AgentFinished, AgentStarted, Event


class AgentStatusView:
    """Collects events; renders a table of agents with running / done / failed states."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._rows: dict[tuple[int, int], dict[str, Any]] = {}
        self._live: Live | None = None

    def __enter__(self) -> AgentStatusView:
        # Live re-renders `self` (through __rich__) on every refresh, so timers keep ticking.
        self._live = Live(self, console=self.console, refresh_per_second=8, transient=False)
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.__exit__(None, None, None)
            self._live = None

    def update(self, event: Event) -> None:
        if isinstance(event, AgentStarted):
            if event.is_aggregator:
                self.stop()  # the answer streams to stdout from here on
                return
            self._rows[(event.layer, event.index)] = {
                "name": f"{event.provider}/{event.model}",
                "started": time.monotonic(),
                "result": None,
            }
        elif isinstance(event, AgentFinished) and not event.is_aggregator:
            row = self._rows.get((event.result.layer, event.result.index))
            if row is not None:
                row["result"] = event.result
        if self._live is not None:
            self._live.refresh()

    def __rich__(self) -> Table:
        table = Table.grid(padding=(0, 2))
        for (layer, _index), row in sorted(self._rows.items()):
            result = row["result"]
            if result is None:
                state = Text(f"running {time.monotonic() - row['started']:.1f} s", style="yellow")
            elif result.ok:
                note = " (truncated)" if result.status == "truncated" else ""
                state = Text(f"done in {result.latency_s:.1f} s{note}", style="green")
            else:
                state = Text(f"{result.status}: {result.error or ''}"[:120], style="red")
            table.add_row(Text(f"layer {layer}", style="dim"), row["name"], state)
        return table

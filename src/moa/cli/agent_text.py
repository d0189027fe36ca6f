"""`moa ask --show-agents`: every proposer's text on stderr as it streams, line by line.

Agents of a layer write at the same time, so their text is printed by whole lines, each line
prefixed with the agent it came from; a line still open when its agent finishes is printed
then. The aggregator's text is the answer on stdout and is not repeated here.
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from moa.results import AgentFinished, AgentStarted, AgentTextDelta, Event

__all__ = ["AgentTextPrinter"]


class AgentTextPrinter:
    def __init__(self, console: Console) -> None:
        # A rich console: while the live status table is on screen, its lines go above it.
        self.console = console
        self._labels: dict[tuple[int, int], str] = {}
        self._open: dict[tuple[int, int], str] = {}

    def update(self, event: Event) -> None:
        if isinstance(event, AgentStarted):
            if not event.is_aggregator:
                self._labels[(event.layer, event.index)] = (
                    f"[layer {event.layer} · {event.provider}/{event.model}#{event.index}]"
                )
        elif isinstance(event, AgentTextDelta):
            key = (event.layer, event.index)
            if key not in self._labels:
                return  # the aggregator
            *lines, rest = (self._open.get(key, "") + event.text).split("\n")
            self._open[key] = rest
            for line in lines:
                self._print(key, line)
        elif isinstance(event, AgentFinished):
            key = (event.result.layer, event.result.index)
            rest = self._open.pop(key, "")
            if rest and key in self._labels:
                self._print(key, rest)

    def _print(self, key: tuple[int, int], line: str) -> None:
        text = Text(self._labels[key] + " ", style="dim")
        text.append(line)
        self.console.print(text, soft_wrap=True, highlight=False)

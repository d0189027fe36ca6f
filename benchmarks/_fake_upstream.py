"""Start the fake OpenAI-compatible server as its own process, for benchmarks.

A server sharing the benchmark's process would share its GIL and event loop, and we would
measure the fake server instead of MoA.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def fake_upstream(*args: str) -> Iterator[str]:
    """Yield the base_url of a fake server started with `python -m moa.testing.fake_server ARGS`."""
    process = subprocess.Popen(
        [sys.executable, "-m", "moa.testing.fake_server", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("listening "):
            raise RuntimeError(f"the fake server did not start: {line!r}")
        yield line.split()[1]
    finally:
        process.terminate()
        process.wait(timeout=10)

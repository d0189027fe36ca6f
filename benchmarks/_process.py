"""Run a Python command as its own process for a benchmark, once it says it is ready."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def ready_process(
    args: list[str], workdir: Path, name: str, pattern: str, *, start_timeout: float = 60.0
) -> Iterator[tuple[str, int]]:
    """Run `python ARGS`; yield the first group of `pattern` once it shows on stdout, and the
    pid. Output goes to files: a full pipe would stall the process under test."""
    stdout = workdir / f"{name}.out"
    stderr = workdir / f"{name}.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen([sys.executable, *args], stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + start_timeout
        while not (found := re.search(pattern, stdout.read_text())):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{stderr.read_text()[-2000:]}")
            time.sleep(0.05)
        yield found.group(1), process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

"""The public surface: what `import moa` promises, and the optional extras' import errors."""

from __future__ import annotations

import subprocess
import sys

import moa


def test_every_name_in_all_is_exported_and_nothing_public_is_missing() -> None:
    for name in moa.__all__:
        assert hasattr(moa, name), name
    public = {
        name
        for name, value in vars(moa).items()
        if not name.startswith("_") and not isinstance(value, type(moa))
    }
    assert public <= set(moa.__all__) | {"annotations"}


def test_every_error_derives_from_the_one_base() -> None:
    errors = [getattr(moa, n) for n in moa.__all__ if n.endswith(("Error", "Failed"))]
    errors += [moa.RateLimited, moa.ProviderTimeout, moa.BudgetExceeded, moa.StreamInterrupted]
    for error in errors:
        assert issubclass(error, moa.MoAError), error


def test_a_missing_extra_names_the_install_command() -> None:
    # Hide starlette as if the [server] extra were not installed.
    code = (
        "import sys; sys.modules['starlette'] = None\n"
        "try:\n"
        "    import moa.server\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "pip install 'mixture-of-agents[server]'" in done.stdout


def test_a_missing_local_extra_names_the_install_command() -> None:
    code = (
        "import asyncio, sys; sys.modules['llama_cpp'] = None\n"
        "from moa import MoA, MissingExtraError\n"
        "try:\n"
        "    MoA.from_preset('local').run('hi')\n"
        "except MissingExtraError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "pip install 'mixture-of-agents[local]'" in done.stdout, done.stderr

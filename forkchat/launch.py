"""How the executables in bin/ start: under the project's .venv when there is one, and,
before the first ``make`` has installed the requirements, with one line that says so
instead of a traceback.

Imports nothing outside the standard library: it must run where nothing is installed.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
EXIT_NOT_INSTALLED = 1


def enter_venv() -> None:
    """Run again under .venv's python when there is one and it is not this one."""
    python = VENV / "bin" / "python"
    if python.exists() and Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(python, [str(python), *sys.argv])


def run(module: str) -> None:
    """Run ``module``'s ``main()`` and exit with its status."""
    enter_venv()
    try:
        main = importlib.import_module(module).main
    except ModuleNotFoundError as exc:
        if (exc.name or "forkchat").partition(".")[0] == "forkchat":
            raise  # a broken checkout, not a missing requirement
        prog = f"bin/{Path(sys.argv[0]).name}"
        print(
            f"{prog}: the Python package {exc.name!r} is missing: run 'make run' or "
            "'make test' once first (either creates .venv with the requirements), or "
            "install requirements.txt again if it changed",
            file=sys.stderr,
        )
        sys.exit(EXIT_NOT_INSTALLED)
    sys.exit(main())

"""This checkout, as tests that start ``snakemake`` or Python subprocesses need it."""

from __future__ import annotations

import os
from pathlib import Path

#: the repository root (``tests/helpers/`` is two levels below it)
REPO = Path(__file__).resolve().parents[2]
#: the example Snakemake workflow the plugin's tests run
EXAMPLE = REPO / "examples" / "gpu_pipeline"


def checkout_env() -> dict[str, str]:
    """This process's environment with the checkout first on ``PYTHONPATH``.

    snakemake finds executor plugins by scanning sys.path for the package name; an
    import-hook editable install is invisible to that scan, so the checkout goes on the path.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep)
    return env

"""Make ``docs/widget.png``: the cluster widget from a real notebook run, drawn by Chromium.

``python docs/screenshot.py`` starts a local Vast marketplace (``dask_vastai.emulator``),
executes a notebook against it with ``nbclient`` (a real Jupyter kernel: rent two instances,
display the cluster), takes the cluster's ``text/html`` output and renders it with headless
Chromium (Debian's ``chromium`` package). The notebook tests use the same functions, so
what the README shows is what the tests check.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

#: what the README's screenshot shows: two instances registered, a third loading its image
SCREENSHOT_CELLS = [
    "from dask_vastai import VastAICluster\n"
    'cluster = VastAICluster(gpu="RTX_3090", n=2, name="demo", boot_timeout=120)',
    "import time\n"
    "cluster.scale(3)\n"
    "deadline = time.monotonic() + 60\n"
    'while not any(r["state"] == "loading image" and r["status_msg"] for r in cluster.instances):\n'
    "    assert time.monotonic() < deadline, cluster.instances\n"
    "    time.sleep(0.2)\n"
    "cluster",
    "cluster.close()",
]


def chromium() -> str | None:
    """Debian's Chromium (or another install of it on PATH), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def render_png(html: str, out: Path, *, width: int = 1180, height: int = 300, timeout_s: float = 60) -> Path:
    """Draw ``html`` (a notebook output fragment) as ``out``, a PNG, with headless Chromium."""
    browser = chromium()
    if browser is None:
        raise FileNotFoundError("no chromium on PATH: apt-get install chromium")
    out = Path(out).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "cluster.html"
        page.write_text(
            "<!doctype html><html><head><meta charset='utf-8'></head>"
            "<body style='margin: 12px; background: white;'>" + html + "</body></html>",
            encoding="utf-8",
        )
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}",
             f"--screenshot={out}", page.as_uri()],
            check=True, capture_output=True, timeout=timeout_s,
        )
    if not out.exists() or out.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot at {out}")
    return out


def run_notebook(
    cells: Sequence[str], *, env: Mapping[str, str], cwd: Path, timeout_s: float = 240
) -> tuple[Any, dict[int, dict[str, Any]]]:
    """Execute ``cells`` in a fresh kernel; the notebook, and the widget state after each cell."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    states: dict[int, dict[str, Any]] = {}
    client: NotebookClient

    def snapshot(cell: Any, cell_index: int, execute_reply: Any) -> None:
        states[cell_index] = copy.deepcopy(client.widget_state)

    saved = dict(os.environ)
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = NotebookClient(
            nb, timeout=timeout_s, kernel_name="python3", on_cell_executed=snapshot,
            resources={"metadata": {"path": str(cwd)}},
        )
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return nb, states


def html_outputs(cell: Any) -> list[str]:
    """The ``text/html`` of each rich output of a cell, in order."""
    return [o["data"]["text/html"] for o in cell.get("outputs", [])
            if o.get("output_type") in ("display_data", "execute_result") and "text/html" in o.get("data", {})]


def main() -> int:
    sys.path.insert(0, str(HERE.parent))
    from dask_vastai.emulator import Emulator

    # Loading lasts longer than a poll interval, so the third instance is caught loading.
    with Emulator(boot_delay_s=5.0) as emu, tempfile.TemporaryDirectory() as tmp:
        env = {"VAST_API_KEY": emu.api_key, "DASK_VASTAI__API_URL": emu.url,
               "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
        nb, _ = run_notebook(SCREENSHOT_CELLS, env=env, cwd=Path(tmp))
        html = html_outputs(nb.cells[1])[-1]
    out = render_png(html, HERE / "widget.png")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

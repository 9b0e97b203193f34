"""The cluster in Jupyter: real kernels (nbclient) against the emulator, with and without ipywidgets.

With ipywidgets the cluster's output is a widget view, so the test reads the widget's model
state as the kernel sent it (after each cell, and at the end); without, the ``text/html``
a notebook shows. Either way the output names the GPU model, a $/h, a $ spent, each
instance's phase and the dashboard link, and a display after ``scale(2)`` shows the second
instance. The HTML view is also drawn by headless Chromium, with the code that made
``docs/widget.png`` (``docs/screenshot.py``).

Runs on the strict profile (the ``market`` fixture); destroyed rows do not linger, since the
tests assert them gone once the cluster closed.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]

pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[2]


def _screenshot_module() -> Any:
    spec = importlib.util.spec_from_file_location("dask_vastai_docs_screenshot", ROOT / "docs" / "screenshot.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shot = _screenshot_module()


@pytest.fixture(autouse=True)
def no_lingering_rows(market) -> None:
    """Destroyed rows gone at once: these tests assert ``market.instances() == []`` after close."""
    market.variants.set(destroy_linger_s=0)

WAIT_FOR_TWO = (
    "import time\n"
    "deadline = time.monotonic() + 150\n"
    'while sum(r["state"] == "registered" for r in cluster.instances) < 2:\n'
    "    assert time.monotonic() < deadline, cluster.instances\n"
    "    time.sleep(0.25)\n"
    "cluster"
)


def _cells(*, widgets: bool) -> list[str]:
    cells = [] if widgets else ['import sys\nsys.modules["ipywidgets"] = None  # as if not installed']
    return cells + [
        "from dask_vastai import VastAICluster\n"
        'cluster = VastAICluster(gpu="RTX_3090", n=1, name="nb", boot_timeout=150)\n'
        "cluster",
        "cluster.scale(2)\ncluster",
        WAIT_FOR_TWO,
        "cluster.close()\ncluster",
    ]


def _run(market, tmp_path: Path, *, widgets: bool) -> tuple[Any, dict[int, dict[str, Any]], int]:
    env = {"VAST_API_KEY": market.api_key, "DASK_VASTAI__API_URL": market.url}
    nb, states = shot.run_notebook(_cells(widgets=widgets), env=env, cwd=tmp_path)
    return nb, states, 0 if widgets else 1


def _no_red_info(nb: Any) -> None:
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                assert " - INFO - " not in out["text"], out["text"]
            assert out.get("output_type") != "error", out


def _instance_ids(market) -> list[str]:
    return [str(row["id"]) for row in market.meter()["instances"]]


def _says_the_essentials(html: str, *, link: bool = True) -> None:
    assert "RTX 3090" in html, html
    assert re.search(r"\$\d+\.\d{3}/h", html), html
    assert re.search(r"\$\d+\.\d+ spent", html), html
    if link:
        assert re.search(r"href='http://127\.0\.0\.1:\d+/status'", html), html


def test_notebook_without_ipywidgets_shows_the_html_view(market, tmp_path) -> None:
    nb, _, first = _run(market, tmp_path, widgets=False)
    _no_red_info(nb)
    assert not [o for c in nb.cells for o in c.get("outputs", [])
                if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    after_boot = shot.html_outputs(nb.cells[first])[-1]
    _says_the_essentials(after_boot)
    assert "1: 1 registered" in after_boot and "1 registered of 1" in after_boot
    right_after_scale = shot.html_outputs(nb.cells[first + 1])[-1]
    # The second instance is there at once, as booting, and the workers say so.
    assert "1 booting" in right_after_scale and "1 registered of 2" in right_after_scale, right_after_scale
    assert "Workers: 0" not in right_after_scale
    both = shot.html_outputs(nb.cells[first + 2])[-1]
    _says_the_essentials(both)
    ids = _instance_ids(market)
    assert len(ids) == 2 and all(i in both for i in ids), (ids, both)
    assert both.count(">registered<") == 2 and "2 registered of 2" in both
    closed = shot.html_outputs(nb.cells[first + 3])[-1]
    assert "(closed)" in closed and closed.count(">destroyed<") == 2
    assert market.instances() == []


def _widget_html(state: dict[str, Any]) -> str:
    """The cluster view's HTML in the kernel's widget models (the HTML model under our VBox)."""
    values = [m.get("value", "") for m in state.values() if m.get("_model_name") == "HTMLModel"]
    ours = [v for v in values if "dask-vastai-cluster" in v]
    assert len(ours) == 1, values
    return ours[0]


def test_notebook_with_ipywidgets_shows_a_live_widget(market, tmp_path) -> None:
    pytest.importorskip("ipywidgets")
    nb, states, first = _run(market, tmp_path, widgets=True)
    _no_red_info(nb)
    view = [o for o in nb.cells[first]["outputs"]
            if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert view, nb.cells[first]["outputs"]
    model_id = view[0]["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
    after_boot = states[first]
    assert after_boot[model_id]["_model_name"] == "VBoxModel"
    html = _widget_html(after_boot)
    _says_the_essentials(html)
    assert ">registered<" in html and "1 registered of 1" in html
    booting = _widget_html(states[first + 1])
    assert "1 booting" in booting and "1 registered of 2" in booting, booting
    both = _widget_html(states[first + 2])
    ids = _instance_ids(market)
    assert len(ids) == 2 and all(i in both for i in ids)
    assert both.count(">registered<") == 2
    # Refreshed until the end: the last state is the closed cluster with its final cost.
    final = _widget_html(states[first + 3])
    assert "(closed)" in final and final.count(">destroyed<") == 2
    _says_the_essentials(final)
    # The same models are saved in the notebook, as a front-end would restore them.
    assert model_id in nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert market.instances() == []


@pytest.mark.skipif(shot.chromium() is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_the_html_view_renders_as_a_png(market, tmp_path) -> None:
    from dask_vastai import VastAICluster

    with VastAICluster(gpu="RTX_3090", n=1, api_url=market.url, api_key=market.api_key, quiet=True,
                       boot_timeout=150) as cluster:
        html = cluster._repr_html_()
    _says_the_essentials(html)
    png = shot.render_png(html, tmp_path / "widget.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert market.instances() == []

"""``dask-vastai offers`` shows what a cluster with the same options would rent, and says it plainly.

"What would be rented" must be what is rented: the command builds its query from the same
shape options over the same ``vastai:`` config and ``DASK_VASTAI__*`` variables as
``VastAICluster``, which these tests check against the cluster's own ``offers()``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import dask_vastai
from dask_vastai import VastAICluster


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_VASTAI", "VAST_API_KEY"))}
    return subprocess.run([sys.executable, "-m", "dask_vastai.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**clean, **(env or {})})


def test_version() -> None:
    proc = _cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"dask-vastai {dask_vastai.__version__}"


def test_offers_honour_the_config_and_env_as_the_cluster_does(emulator) -> None:
    # Pointed at the emulator the way its printed export lines do it, options from DASK_VASTAI__*.
    env = {"VAST_API_KEY": emulator.api_key, "DASK_VASTAI__API_URL": emulator.url,
           "DASK_VASTAI__GPU": "RTX_4090", "DASK_VASTAI__MAX_PRICE": "0.9", "DASK_VASTAI__RELIABILITY": "0.95",
           "DASK_VASTAI__DISK": "100"}
    proc = _cli("offers", "--json", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shown = json.loads(proc.stdout)
    assert "gpu_name=RTX_4090" in shown["query"] and "dph_total<=0.9" in shown["query"], shown["query"]
    assert "reliability>=0.95" in shown["query"] and "disk_space>=100" in shown["query"], shown["query"]
    assert shown["offers"] and all(o["gpu_name"] == "RTX 4090" and o["dph_total"] <= 0.9 for o in shown["offers"])
    prices = [o["dph_total"] for o in shown["offers"]]
    assert prices == sorted(prices), "cheapest first, as rentals take them"
    # The cluster, given the same config, sends the same query and sees the same offers.
    import dask.config

    with dask.config.set({"vastai.gpu": "RTX_4090", "vastai.max-price": 0.9, "vastai.reliability": 0.95,
                          "vastai.disk": 100}), \
            VastAICluster(api_key=emulator.api_key, api_url=emulator.url, quiet=True) as cluster:
        preview = cluster.offers()
    assert preview.query_text == shown["query"]
    assert preview.query == shown["sent"]
    assert [o.id for o in preview.offers] == [o["id"] for o in shown["offers"]]
    # A flag still wins over the config.
    flagged = json.loads(_cli("offers", "--json", "--gpu", "RTX_3090", env=env).stdout)
    assert "gpu_name=RTX_3090" in flagged["query"] and "dph_total<=0.9" in flagged["query"]


def test_offers_piped_are_not_cut_to_80_columns(emulator) -> None:
    proc = _cli("offers", "--api-url", emulator.url, "--api-key", emulator.api_key, "--limit", "20",
                "--no-datacenter", "--reliability", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shown = json.loads(_cli("offers", "--api-url", emulator.url, "--api-key", emulator.api_key, "--limit", "20",
                            "--no-datacenter", "--reliability", "0", "--json").stdout)["offers"]
    rows = {line.split()[1]: line for line in proc.stdout.splitlines() if line.split()[1:2] and line.split()[1].isdigit()}
    assert len(rows) == len(shown), proc.stdout
    for offer in shown:
        row = rows[str(offer["id"])]
        # one line per offer, every cell whole: the location, the price, the GPU name
        assert offer["geolocation"] in row and f"{offer['dph_total']:.3f}" in row and offer["gpu_name"] in row, row
        assert "…" not in row
    assert max(len(line) for line in proc.stdout.splitlines()) > 80


def test_an_unknown_gpu_is_answered_with_close_names(emulator) -> None:
    proc = _cli("offers", "--gpu", "RTX_3099", "--api-url", emulator.url, "--api-key", emulator.api_key)
    assert proc.returncode == 2
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text
    assert "RTX_3090" in text and "RTX_3090_Ti" in text, text
    assert "dask-vastai offers --gpu RTX_3090" in text and "dask-vastai gpus" in text, text
    assert "KNOWN_GPU_NAMES" not in text, "a user types commands, not Python names"
    listed = _cli("gpus")
    assert listed.returncode == 0 and "RTX_3090" in listed.stdout.splitlines()
    assert "A100_SXM4" in listed.stdout.splitlines(), "names as --gpu takes them"

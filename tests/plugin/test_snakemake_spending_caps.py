"""The spending-cap flags reach the cluster: ``--vastaidask-max-hourly``, ``--vastaidask-max-cost``.

Each run asks for a cap that not even the cheapest matching offer fits: the cluster refuses
it at start, before anything is rented, and Snakemake prints one sentence naming the flag
(records-only emulator: nothing needs to boot for that).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dask_vastai.emulator import Emulator
from tests.plugin.test_snakemake_config_errors import _error_text, snakemake


@pytest.fixture
def emu() -> Emulator:
    with Emulator(runtime="record", rate_limits=False, boot_delay_s=0) as emu:
        yield emu


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--vastaidask-max-hourly", "0.01", "past --vastaidask-max-hourly=$0.010/h"),
    ("--vastaidask-max-cost", "0.0001", "more than --vastaidask-max-cost=$0.0001000 before it could be destroyed"),
])
def test_a_spending_cap_flag_reaches_the_cluster(emu: Emulator, tmp_path: Path, flag: str, value: str,
                                                 says: str) -> None:
    message = _error_text(snakemake(tmp_path, "--vastaidask-api-url", emu.url, "--vastaidask-api-key", emu.api_key,
                                    "--vastaidask-gpu", "RTX_3090", flag, value))
    assert says in message, message
    assert "max_hourly=" not in message.replace(flag, "") and "max_cost=" not in message.replace(flag, ""), message
    assert [r for r in emu.requests if r["endpoint"] == "create"] == [] and emu.instances() == []

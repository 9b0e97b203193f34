"""An API outage is waited out, saying so; past ``api.outage-timeout`` the error says how long.

The emulator answers every call 503 for a while (``faults.outage``), as Vast behind its
proxy does when it is down. A client that Vast answered before keeps retrying past
``max-attempts`` through the outage with a "waiting for Vast" notice; one that never
got an answer is not kept waiting (see test_bad_inputs_fast).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import dask.config
import pytest

from dask_vastai.exceptions import VastServerError
from dask_vastai.vast import VastAPI


def test_an_outage_is_waited_out_with_a_notice(emulator: Any) -> None:
    notices: list[str] = []

    async def main() -> float:
        with dask.config.set({"vastai.api.outage-notice-every": 1}):
            api = VastAPI(emulator.api_key, emulator.url, pace=False, max_attempts=2, backoff_s=0.2,
                          backoff_max_s=0.5, outage_timeout_s=60)
        async with api:
            api.on_outage = notices.append
            await api.current_user()  # Vast answered once: what fails now is an outage
            emulator.faults.outage(4)
            started = time.monotonic()
            assert await api.list_instances() == []
            return time.monotonic() - started

    took = asyncio.run(main())
    assert took >= 3.5, took
    assert notices and "waiting for Vast" in notices[0] and "503" in notices[0], notices


def test_past_outage_timeout_the_error_says_how_long(emulator: Any) -> None:
    async def main() -> None:
        async with VastAPI(emulator.api_key, emulator.url, pace=False, max_attempts=2, backoff_s=0.2,
                           backoff_max_s=0.5, outage_timeout_s=2) as api:
            await api.current_user()
            emulator.faults.outage(30)
            with pytest.raises(VastServerError) as caught:
                await api.list_instances()
            assert "503" in str(caught.value) and " over " in str(caught.value), str(caught.value)
            emulator.faults.outage(0)

    asyncio.run(main())

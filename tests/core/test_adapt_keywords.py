"""``adapt()`` takes what distributed's ``Cluster.adapt`` takes (emulator, nothing rented)."""

from __future__ import annotations

import warnings

import pytest

from dask_vastai import VastAICluster


def test_stock_keywords_work_and_the_ignored_ones_are_named_once(emulator) -> None:
    with VastAICluster(gpu="RTX_3090", api_url=emulator.url, api_key=emulator.api_key, quiet=True) as cluster:
        with pytest.warns(UserWarning, match=r"target_duration \(a GPU task needs a GPU however short"):
            adaptive = cluster.adapt(minimum=0, maximum=3, target_duration="5s")
        assert (adaptive.minimum, adaptive.maximum) == (0, 3)
        assert adaptive.policy.idle_timeout_s is None  # the boot-time break-even
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = cluster.adapt(minimum=0, maximum=3, target_duration="5s", interval="2s", wait_count=3)
        assert again.policy.idle_timeout_s == 6  # 3 intervals of 2 s: the explicit wait wins
        with pytest.warns(UserWarning, match="minimum_memory .*cpu_ram="):
            cluster.adapt(minimum_memory="10 GiB", target_duration="5s")
        with pytest.raises(ValueError, match="'target_duraton'.*target_duration"):
            cluster.adapt(maximum=3, target_duraton="5s")
        assert emulator.instances() == []  # no demand, nothing rented

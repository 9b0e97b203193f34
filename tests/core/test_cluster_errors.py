"""Bad input fails at construction, within seconds, with a sentence and no rental left."""

from __future__ import annotations

import time

import pytest

from dask_vastai import VastAICluster


def _make(emu, **kwargs):
    return VastAICluster(api_url=emu.url, api_key=emu.api_key, quiet=True, **kwargs)


def test_unknown_gpu_lists_close_names(emulator_rate_limited) -> None:
    t0 = time.monotonic()
    with pytest.raises(ValueError) as err:
        _make(emulator_rate_limited, gpu="RTX_3900", n=1)
    text = str(err.value)
    assert "RTX_3900" in text and "RTX_3090" in text
    assert time.monotonic() - t0 < 10
    assert emulator_rate_limited.instances() == []


def test_no_offer_shows_query_and_nearest_offers(emulator_rate_limited) -> None:
    t0 = time.monotonic()
    with pytest.raises(Exception) as err:
        _make(emulator_rate_limited, gpu="RTX_3090", n=1, max_price=0.001)
    text = str(err.value)
    assert "dph_total" in text, text            # the query as sent
    assert "RTX 3090" in text and "$" in text   # nearest offers with their prices
    assert time.monotonic() - t0 < 15
    assert emulator_rate_limited.instances() == []


def test_rejected_key_says_so_without_showing_it(emulator_rate_limited) -> None:
    with pytest.raises(Exception) as err:
        _make_bad = VastAICluster(
            api_url=emulator_rate_limited.url, api_key="not-the-key-12345", gpu="RTX_3090", n=1, quiet=True
        )
        del _make_bad
    text = str(err.value)
    assert "key" in text.lower() and "rejected" in text.lower() or "invalid" in text.lower()
    assert "not-the-key-12345" not in text
    assert emulator_rate_limited.instances() == []


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"num_gpus": 0}, "num_gpus"),
        ({"disk": -5}, "disk"),
        ({"reliability": 1.5}, "reliability"),
        ({"max_price": -1}, "max_price"),
        ({"region": "MARS"}, "MARS"),
        ({"n": -1}, "n=-1"),
        ({"boot_timeout": 0}, "boot_timeout"),
        ({"name": "a:b"}, "a:b"),
        ({"query": "gpu_name="}, "gpu_name="),
    ],
)
def test_impossible_values_name_themselves(emulator_rate_limited, kwargs, word) -> None:
    with pytest.raises(ValueError) as err:
        _make(emulator_rate_limited, gpu="RTX_3090", **kwargs)
    assert word in str(err.value)
    assert emulator_rate_limited.instances() == []


def test_previews_rent_nothing(emulator_rate_limited) -> None:
    with _make(emulator_rate_limited, gpu="RTX_4090", max_price=2.0) as cluster:
        script = cluster.onstart_script()
        assert len(script) < 4048
        assert "BEGIN" not in script and emulator_rate_limited.api_key not in script
        preview = cluster.offers()
        assert preview.offers and all(o.gpu_name == "RTX 4090" for o in preview.offers)
        assert "gpu_name" in preview.query_text
        assert all(o.dph_total <= 2.0 for o in preview.offers)
        prices = [o.dph_total for o in preview.offers]
        assert prices == sorted(prices)
        assert cluster.cost == 0 and cluster.instances == []
    assert emulator_rate_limited.instances() == []
    assert not [r for r in emulator_rate_limited.requests if "asks" in r["path"]]

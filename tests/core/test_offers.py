"""Requirements -> the query a user could paste into ``vastai search offers``, and the errors
a user sees for requirements Vast cannot match."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dask_vastai.offers import (
    REGIONS,
    OfferRequirements,
    canonical_gpu_name,
    no_match_message,
    region_codes,
)
from dask_vastai.vast import Offer
from dask_vastai.vast.query import parse_query, search_body


@pytest.mark.parametrize("spelling", ["RTX_3090", "rtx 3090", "RTX3090", "rtx-3090", "RTX 3090"])
def test_gpu_spellings_users_write_mean_vast_s_name(spelling: str) -> None:
    assert canonical_gpu_name(spelling) == "RTX 3090"
    req = OfferRequirements(gpu=spelling)
    req.validate()
    assert req.query_text().startswith("gpu_name=RTX_3090 ")
    assert req.filters()["gpu_name"] == {"eq": "RTX 3090"}


def test_default_requirements_ask_for_reliable_verified_datacenter_hosts() -> None:
    req = OfferRequirements(gpu="RTX_4090")
    assert req.query_text() == "gpu_name=RTX_4090 num_gpus=1 disk_space>=40 reliability>=0.98 datacenter=true"
    q = req.filters()
    assert q["verified"] == {"eq": True} and q["rentable"] == {"eq": True}
    assert q["rented"] == {"eq": False} and q["external"] == {"eq": False}
    assert q["datacenter"] == {"eq": True} and q["reliability"] == {"gte": "0.98"}
    assert q["num_gpus"] == {"eq": "1"}  # exact: an 8-GPU machine is not what was asked


def test_every_requirement_becomes_a_filter() -> None:
    req = OfferRequirements(
        gpu=["RTX_3090", "rtx4090"], num_gpus=2, gpu_ram_gb=24, cpu_ram_gb=64, cpu_cores=16, disk_gb=100,
        max_price=0.8, region="DE,pl", datacenter=False, reliability=0.99, query="cuda_max_good>=12.4",
    )
    req.validate()
    assert req.query_text() == (
        "gpu_name in [RTX_3090,RTX_4090] num_gpus=2 gpu_ram>=24 cpu_ram>=64 cpu_cores_effective>=16 "
        "disk_space>=100 dph_total<=0.8 reliability>=0.99 geolocation in [DE,PL] cuda_max_good>=12.4"
    )
    q = req.filters()
    assert q["gpu_name"] == {"in": ["RTX 3090", "RTX 4090"]}
    assert q["gpu_ram"] == {"gte": 24000.0} and q["cpu_ram"] == {"gte": 64000.0}  # GB -> MB as the SDK
    assert q["geolocation"] == {"in": ["DE", "PL"]}
    assert "datacenter" not in q
    assert q["cuda_max_good"] == {"gte": "12.4"}
    # The text is the query: parsing it the SDK's way gives the dict.
    assert parse_query(req.query_text()) == {k: v for k, v in q.items() if k not in ("verified", "rentable", "rented", "external")}


def test_a_region_expands_to_its_countries() -> None:
    assert region_codes("EU")[:3] == list(REGIONS["EU"][:3]) and "PL" in region_codes("eu")
    assert region_codes("NA") == ["US", "CA"]  # the region, not Namibia
    assert region_codes(["EU", "US"])[-1] == "US"
    req = OfferRequirements(gpu="RTX_3090", region="NA")
    assert "geolocation in [US,CA]" in req.query_text()


def test_a_wildcard_in_the_extra_query_drops_a_default_filter() -> None:
    req = OfferRequirements(gpu="RTX_3090", query="verified=any")
    body = search_body(req.filters(), order=req.order)
    assert body["verified"] == {}  # an empty filter: any, and the dict defaults cannot restore it
    assert body["rentable"] == {"eq": True}


def test_query_option_reads_as_text_and_replace_keeps_working() -> None:
    req = OfferRequirements(gpu="RTX_3090", query="inet_down>=500")
    assert req.query == "inet_down>=500" and isinstance(req.filters(), dict)
    relaxed = replace(req, query="", max_price=None)
    assert relaxed.query == "" and "inet_down" not in relaxed.filters()
    assert relaxed == replace(req, query="")
    assert "query='inet_down>=500'" in repr(req)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"gpu": "RTX 3099"}, ["gpu='RTX 3099'", "RTX_3090"]),
        ({"gpu": "A100"}, ["gpu='A100'", "A100_PCIE", "A100_SXM4"]),
        ({"gpu": ["RTX_3090", "H100 SMX"]}, ["gpu='H100 SMX'", "H100_SXM"]),
        ({"num_gpus": 0}, ["num_gpus=0", "at least 1"]),
        ({"max_price": -1}, ["max_price=-1", "positive"]),
        ({"max_price": 0}, ["max_price=0", "positive"]),
        ({"cpu_ram_gb": 0}, ["cpu_ram=0"]),
        ({"disk_gb": -5}, ["disk=-5"]),
        ({"reliability": 98}, ["reliability=98", "between 0 and 1"]),
        ({"region": "EUROPE"}, ["region='EUROPE'", "EU"]),
        ({"region": "DE,XX"}, ["'XX'", "ISO-2"]),
        ({"query": "gpu_name=RTX 4090"}, ["query='gpu_name=RTX 4090'", "_"]),
        ({"query": "dph_total<"}, ["query='dph_total<'", "no value"]),
    ],
)
def test_bad_requirements_fail_with_the_value_and_the_fix(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as e:
        OfferRequirements(**kwargs).validate()
    for word in words:
        assert word in str(e.value), f"{word!r} missing from: {e.value}"


def _offer(id: int, price: float, geo: str, reliability: float, datacenter: bool = True) -> Offer:
    return Offer.from_json({
        "id": id, "gpu_name": "RTX 4090", "num_gpus": 1, "gpu_ram": 24564, "cpu_cores_effective": 16,
        "cpu_ram": 64000, "disk_space": 200, "dph_total": price, "reliability": reliability,
        "geolocation": geo, "hosting_type": 1 if datacenter else 0, "verification": "verified",
    })


def test_no_match_message_shows_the_query_the_nearest_offers_and_what_to_relax() -> None:
    req = OfferRequirements(gpu="RTX_4090", max_price=0.2, region="EU")
    nearest = [_offer(11, 0.35, "Warsaw, PL", 0.995), _offer(12, 0.38, "Texas, US", 0.99),
               _offer(13, 0.41, "Berlin, DE", 0.97, datacenter=False)]
    text = no_match_message(req, req.filters(), nearest)
    assert req.query_text() in text and '"dph_total": {"lte": "0.2"}' in text
    assert "offer 11: 1x RTX 4090, $0.350/h, Warsaw, PL, reliability 0.995, datacenter" in text
    assert "excluded by max_price=0.2 (this one costs $0.350/h)" in text
    assert "excluded by region='EU' (this one is in US)" in text
    assert "excluded by datacenter=True" in text
    assert "Relax max_price first (the cheapest of these is $0.350/h)" in text


def test_no_match_message_without_any_offer_suggests_another_gpu() -> None:
    req = OfferRequirements(gpu="H200", num_gpus=8)
    text = no_match_message(req, req.filters(), [])
    assert "8x H200" in text and "another GPU model" in text


def test_offer_records_read_vast_s_fields() -> None:
    o = _offer(5, 0.5, "Quebec, CA", 0.99)
    assert (o.country, o.datacenter, o.verified, o.gpu_total_ram_mb) == ("CA", True, True, 24564)
    bare = Offer.from_json({"id": 7})
    assert bare.gpu_name == "" and bare.dph_total == 0.0 and bare.country is None

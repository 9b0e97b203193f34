"""Our offer query language against the official SDK's, on the queries users write.

One oracle subprocess runs the whole table: for each case it captures the body that
``VastAI(...).search_offers(...)`` would POST (its HTTP layer is replaced by a recorder)
and the SDK's ``parse_order``; we compare those with ours, dict for dict.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from dask_vastai.vast import CreateRequest
from dask_vastai.vast.query import parse_order, search_body
from tests.helpers.oracle import run_sdk

pytestmark = pytest.mark.oracle

#: (query, order, limit, storage_gb)
SEARCHES: list[tuple[str, str, int | None, float]] = [
    ("gpu_name=RTX_4090 num_gpus>=2 dph_total<0.5 geolocation in [DE,PL]", "dph_total", 5, 40),
    ("gpu_name=RTX_4090 num_gpus>=1 verified=true rentable=true dph_total<1", "dph_total", 5, 40),
    ("cpu_ram>=64", "score-", None, 5.0),
    ("gpu_ram>=24 gpu_total_ram>=48", "dph", 10, 20),
    ("verified=any", "dph_total", None, 5.0),
    ("verified=any rentable=any external=*", "dph_total", None, 5.0),
    ("reliability>0.98 datacenter=true", "dph_total", 3, 30),
    ("driver_version>=535.86.05", "dph_total", None, 5.0),
    ("gpu_name in [RTX_3090,RTX_4090]", "dph+,dlperf-", None, 5.0),
    ('gpu_name="RTX 4090"', "dph_total", None, 5.0),
    ("dph<1", "-dph", None, 5.0),
    ("num_gpus=8 gpu_name=H100_SXM", "dph_total", 2, 100),
    ("cuda_vers>=12.4", "dph_total", None, 5.0),
    ("geolocation notin [CN,RU] direct_port_count>=4", "dph_total", None, 5.0),
    ("gpu_name != RTX_3090", "dph_total", None, 5.0),
    ("num_gpus gte 2 reliability lt 0.99", "dph_total", None, 5.0),
    ("gpu_name not in [A100_PCIE, A100_SXM4]", "dph_total", None, 5.0),
    ("inet_down>=500 disk_space>=100 static_ip=true", "inet_down-", None, 5.0),
    ("duration>=7", "dph_total", None, 5.0),
    ("external=true rented=any", "dph_total", None, 5.0),
    ("cpu_cores_effective>=16 cpu_ram>=128.5", "dph_total", None, 5.0),
    ("compute_cap>=800 gpu_arch=nvidia", "dph_total", None, 5.0),
    ("host_id=12345 machine_id in [1,2,3]", "dph_total", None, 5.0),
    ("gpu_display_active=false has_avx=true pci_gen>=4", "dph_total", None, 5.0),
    ("dlperf_usd>=100 flops_usd>1", "dlperf_per_dphtotal-", None, 5.0),
    ("verified=false", "dph_total", None, 5.0),
    ("min_bid<=0.2 gpu_name=RTX_3090", "min_bid", None, 5.0),
    ("  gpu_name=RTX_3090   num_gpus=1  ", "dph_total", None, 5.0),
]
#: queries both sides must refuse
BAD_QUERIES = [
    "gpu_name=RTX 4090",  # an unquoted space
    "gpu_name=",
    "num_gpus>=any",
    "cpu_ram>=lots",
    "gpu_name in []",
    "=5",
]
ORDERS = ["score-", "dph_total", "dph+,dlperf-", "-dph", "+inet_down,cuda_vers-", " dph , , num_gpus- "]

_ORACLE = textwrap.dedent(
    """
    import json, sys
    import vastai.api.client as client_mod
    from vastai import VastAI
    from vastai.api.query import parse_order, parse_query, offers_fields, offers_alias, offers_mult
    from vastai.api.instances import build_create_instance_payload

    cases = json.loads(sys.argv[1]) if len(sys.argv) > 1 else json.loads(%r)
    captured = []

    class Resp:
        status_code = 200
        def raise_for_status(self): pass
        def json(self): return {"offers": []}

    def post(self, subpath, query_args=None, json_data=None, timeout=None):
        captured.append((subpath, json.loads(json.dumps(json_data))))
        return Resp()

    client_mod.VastClient.post = post
    vast = VastAI(api_key="test", server_url="http://127.0.0.1:9")
    out = {"search": [], "bad": [], "order": [], "create": None}
    for q, order, limit, storage in cases["search"]:
        captured.clear()
        vast.search_offers(query=q, order=order, limit=limit, storage=storage)
        out["search"].append(captured[-1])
    for q in cases["bad"]:
        try:
            parse_query(q, {}, offers_fields, offers_alias, offers_mult)
            out["bad"].append("accepted")
        except Exception as e:
            out["bad"].append(type(e).__name__)
    out["order"] = [parse_order(o) for o in cases["order"]]
    out["create"] = build_create_instance_payload(**cases["create"])
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def oracle_answers() -> dict:
    cases = {
        "search": SEARCHES,
        "bad": BAD_QUERIES,
        "order": ORDERS,
        "create": dict(
            image="img:tag", disk=40, env="-p 8786:8786 -p 8787:8787 -e FOO=bar -e X='a b'",
            label="dask-vastai:c:w1", onstart_cmd="echo hi", cancel_unavail=True,
            runtype="ssh_direc ssh_proxy", price=0.25,
        ),
    }
    return run_sdk(_ORACLE % json.dumps(cases), timeout=120)  # type: ignore[return-value]


@pytest.mark.parametrize("case", range(len(SEARCHES)), ids=[s[0].strip() for s in SEARCHES])
def test_search_body_matches_the_sdk(oracle_answers: dict, case: int) -> None:
    query, order, limit, storage = SEARCHES[case]
    path, body = oracle_answers["search"][case]
    assert path == "/bundles/"
    ours = search_body(query, order=order, limit=limit, storage_gb=storage)
    assert json.loads(json.dumps(ours)) == body


def test_bad_queries_are_refused_by_both(oracle_answers: dict) -> None:
    for query, theirs in zip(BAD_QUERIES, oracle_answers["bad"], strict=True):
        assert theirs != "accepted", query
        with pytest.raises(ValueError) as e:
            search_body(query)
        assert repr(query.strip()) in str(e.value)  # the message quotes the query


def test_order_matches_the_sdk(oracle_answers: dict) -> None:
    assert [parse_order(o) for o in ORDERS] == oracle_answers["order"]


def test_create_body_matches_the_sdk(oracle_answers: dict) -> None:
    ours = CreateRequest(
        image="img:tag", disk_gb=40, env={"FOO": "bar", "X": "a b"}, ports=(8786, 8787),
        label="dask-vastai:c:w1", onstart="echo hi", runtype="ssh_direc ssh_proxy", price=0.25,
    ).body(123)
    assert ours == oracle_answers["create"]
    assert list(ours) == list(oracle_answers["create"])  # same keys in the same order

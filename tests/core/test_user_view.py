"""What a user reads: instance rows and tables, the cluster's HTML, boot lines, scale's spellings.

No sandbox here: rows are built from the broker's real records, the cluster runs against
the records-only emulator (nothing boots), and the progress reads hand-made rows.
"""

from __future__ import annotations

import io
import time
from types import SimpleNamespace

import pytest
from rich.console import Console

from dask_vastai import ClusterNotAttachable, DaskVastAIError, VastAICluster
from dask_vastai.offers import OfferPreview
from dask_vastai.progress import Progress, choose_mode
from dask_vastai.rentals import RentalRecord
from dask_vastai.status import InstanceRow, InstanceTable, Phase, PhaseBook, instance_table
from dask_vastai.vast import Instance, Offer
from dask_vastai.widget import cluster_html
from tests.helpers.waiting import wait_until

OFFER = Offer.from_json({"id": 11, "gpu_name": "RTX 4090", "num_gpus": 2, "dph_total": 0.8, "gpu_ram": 24000})


def _record(instance_id: int, name: str, *, status: str | None = "loading", msg: str = "", destroyed: bool = False,
            age_s: float = 60) -> RentalRecord:
    now = time.time()
    record = RentalRecord(instance_id=instance_id, worker_name=name, offer=OFFER, dph_total=0.8,
                          rented_at=now - age_s, destroyed_at=now if destroyed else None)
    record.instance = Instance.from_json({"id": instance_id, "actual_status": status, "status_msg": msg,
                                          "start_date": now - age_s, "dph_total": 0.8})
    return record


def _instance(name: str, instance_id: int | None, phase: Phase, reason: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(name=name, instance_id=instance_id, phase=phase, phase_since=time.time() - 5,
                           phase_reason=reason, worker_names=[f"{name}-gpu0", f"{name}-gpu1"],
                           pool=SimpleNamespace(name="big"))


def _table() -> InstanceTable:
    book = PhaseBook()
    book.note(_instance("c-0", 1, Phase.REGISTERED))
    book.note(_instance("c-1", 2, Phase.LOADING))
    book.note(_instance("c-2", 3, Phase.FAILED, "instance 3 shows 0 GPU(s) in nvidia-smi but 2 were rented"))
    records = [
        _record(1, "c-0", status="running"),
        _record(2, "c-1", msg="Pulling image vastai/pytorch: 310/900 MB"),
        _record(3, "c-2", destroyed=True),
    ]
    return instance_table(records, book, {}, registered={"c-0-gpu0", "c-0-gpu1"})


def test_rows_keep_the_dict_keys_existing_code_reads() -> None:
    rows = _table()
    assert isinstance(rows, list) and len(rows) == 3
    first = rows[0]
    assert isinstance(first, InstanceRow)
    assert first["id"] == 1 and first["state"] == "registered" and first["gpu"] == "2x RTX 4090"
    assert first["dph"] == 0.8 and first["workers"] == ["c-0-gpu0", "c-0-gpu1"]
    assert first["cost_usd"] == pytest.approx(0.8 * 60 / 3600, rel=0.05)
    assert dict(first)["pool"] == "big"
    assert rows[1]["state"] == "loading image" and "310/900 MB" in rows[1].detail
    # A failed instance keeps its reason after its rental was destroyed.
    assert rows[2]["state"] == "failed" and "0 GPU(s)" in rows[2]["reason"]
    with pytest.raises(KeyError):
        first["nope"]


def test_a_destroyed_rental_reads_destroyed_and_an_unrented_instance_renting() -> None:
    book = PhaseBook()
    book.note(_instance("c-0", 1, Phase.REGISTERED))
    pool = SimpleNamespace(name="default", gpus_per_instance=1,
                           requirements=SimpleNamespace(gpu_names=lambda: ["RTX 3090"]))
    specs = {"c-1": {"options": {"pool": pool}}}
    rows = instance_table([_record(1, "c-0", destroyed=True)], book, specs, registered=set())
    assert [r["state"] for r in rows] == ["destroyed", "renting"]
    assert rows[1].id is None and rows[1].gpu == "1x RTX 3090" and rows[1].workers == ("c-1",)


def test_the_table_renders_as_html_rich_and_text() -> None:
    rows = _table()
    html = rows._repr_html_()
    assert "<table" in html and "2x RTX 4090" in html and "$0.800/h" in html and "registered" in html
    assert "310/900 MB" in html and "0 GPU(s)" in html
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(rows)
    text = console.file.getvalue()
    assert "loading image" in text and "2x RTX 4090" in text and "$0.800/h" in text
    plain = str(rows)
    assert plain == repr(rows) and "registered" in plain and "<" not in plain
    assert "2 instance(s) alive, $1.600/h now" in plain
    assert str(InstanceTable()) .startswith("no instances")


def test_offer_preview_renders_as_tables() -> None:
    preview = OfferPreview(query_text="gpu_name=RTX_4090 num_gpus=2", query={}, offers=[OFFER])
    assert "RTX 4090" in preview._repr_html_() and "$0.800/h" in preview._repr_html_()
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(preview)
    assert "gpu_name=RTX_4090" in console.file.getvalue() and "11" in console.file.getvalue()
    assert "11: 2x RTX 4090" in repr(preview)


class _View:
    """The few things cluster_html reads, as a started cluster has them."""

    name = "nb"
    status = SimpleNamespace(name="running")
    dashboard_link = "http://127.0.0.1:8787/status"
    scheduler_address = "tls://127.0.0.1:8786"
    hourly_rate = 1.6
    cost = 0.0421
    bandwidth_cost = 0.0012
    adaptive_targets: dict = {}

    def __init__(self, rows: InstanceTable) -> None:
        self.instances = rows


def test_cluster_html_says_booting_and_registered_never_a_bare_zero() -> None:
    book = PhaseBook()
    book.note(_instance("c-0", 1, Phase.LOADING))
    book.note(_instance("c-1", 2, Phase.CONNECTING))
    rows = instance_table([_record(1, "c-0"), _record(2, "c-1")], book, {}, registered=set())
    html = cluster_html(_View(rows))
    assert "2 booting (connecting, loading image)" in html
    assert "0 registered of 4" in html and "start when their instance has booted" in html
    assert "Workers: 0" not in html
    assert "href='http://127.0.0.1:8787/status'" in html
    assert "$1.600/h now, $0.0421 spent (bandwidth $0.001200)" in html
    assert "budget left" not in html


def test_cluster_html_shows_budget_left_and_adaptive_target_when_there() -> None:
    view = _View(_table())
    view.budget_left_usd = 4.25
    view.adaptive_targets = {"default": (0, float("inf"), 3)}
    html = cluster_html(view)
    assert "$4.25 budget left" in html
    assert "default: 0..∞ instances, target 3" in html
    assert "1 failed" in html


def _row(name: str, phase: Phase, detail: str = "", rid: int | None = 7) -> InstanceRow:
    return InstanceRow(id=rid, name=name, gpu="1x RTX 3090", phase=phase, status_msg=detail, reason=None,
                       dph=0.2, uptime_s=1, cost_usd=0.0, workers=(name,), registered_workers=(), pool="default")


def test_plain_lines_print_each_phase_once_and_vast_messages_sparingly(capsys) -> None:
    now = [InstanceTable([_row("c-0", Phase.RENTING, rid=None)])]
    progress = Progress(lambda: now[0], mode="lines", message_every_s=3600)
    progress.refresh()
    progress.refresh()
    now[0] = InstanceTable([_row("c-0", Phase.LOADING, "Pulling image: 10%")])
    progress.refresh()
    now[0] = InstanceTable([_row("c-0", Phase.LOADING, "Pulling image: 20%")])
    progress.refresh()  # within message_every_s: not printed
    now[0] = InstanceTable([_row("c-0", Phase.INSTALLING)])
    progress.refresh()
    now[0] = InstanceTable([_row("c-0", Phase.REGISTERED)])
    progress.refresh()  # said by the cluster's own "ready" log line
    progress.log("c-0: instance 7 ready")
    out = capsys.readouterr().out.splitlines()
    assert [line.split("] ", 1)[1] for line in out] == [
        "c-0: renting",
        "c-0 (instance 7): loading image: Pulling image: 10%",
        "c-0 (instance 7): installing",
        "c-0: instance 7 ready",
    ]
    assert all(line.startswith("[") and "s] " in line for line in out)
    assert "\x1b" not in "".join(out)


def test_quiet_prints_nothing(capsys) -> None:
    progress = Progress(lambda: InstanceTable([_row("c-0", Phase.LOADING, "x")]), mode=choose_mode(True))
    progress.refresh()
    progress.log("rented instance 7")
    progress.close()
    assert capsys.readouterr() == ("", "")


def test_mode_follows_the_output() -> None:
    assert choose_mode(False, io.StringIO()) == "lines"
    assert choose_mode(False, SimpleNamespace(isatty=lambda: True)) == "terminal"


# ----------------------------------------------------------------- the cluster object
def test_scale_spellings_count_instances_and_workers_round_up(emulator) -> None:
    with VastAICluster(gpu="RTX_3090", api_url=emulator.url, api_key=emulator.api_key, quiet=True,
                       pools=[{"name": "quad", "gpu": "RTX_4090", "num_gpus": 4}]) as cluster:
        cluster.scale(jobs=2)
        assert len(cluster.pool_instances()) == 2
        cluster.scale(instances=1)
        assert len(cluster.pool_instances()) == 1
        cluster.scale(workers=6, pool="quad")  # 4 workers per instance: 2 instances
        assert len(cluster.pool_instances("quad")) == 2
        cluster.scale(workers=0, pool="quad")
        cluster.scale(0)
        assert cluster.pool_instances() == [] and cluster.pool_instances("quad") == []
        with pytest.raises(ValueError, match="give one of n, instances, jobs"):
            cluster.scale(2, jobs=2)
        with pytest.raises(ValueError, match="jobs=-1"):
            cluster.scale(jobs=-1)
    assert emulator.instances() == []


def test_from_name_explains_where_clusters_live() -> None:
    with pytest.raises(ClusterNotAttachable) as err:
        VastAICluster.from_name("mine")
    text = str(err.value)
    assert "lives in the process that created it" in text and "dask-vastai ls --cluster mine" in text
    assert isinstance(err.value, DaskVastAIError) and isinstance(err.value, NotImplementedError)


def test_every_public_error_is_importable_from_the_package_and_a_dask_vastai_error() -> None:
    import inspect

    import dask_vastai
    from dask_vastai import exceptions

    public = {name for name, cls in vars(exceptions).items()
              if inspect.isclass(cls) and issubclass(cls, DaskVastAIError) and not name.startswith("_")}
    assert public == set(exceptions.__all__), "exceptions.__all__ lists every public error"
    assert public <= set(dask_vastai.__all__)
    assert all(getattr(dask_vastai, name) is getattr(exceptions, name) for name in public)


def test_a_failed_boot_shows_failed_with_vasts_reason_after_the_rental_is_gone(emulator) -> None:
    import dask.config

    emulator.faults.fail_boot("oci runtime", count=1)
    with dask.config.set({"vastai.max-boot-attempts": 1}), VastAICluster(
        gpu="RTX_3090", api_url=emulator.url, api_key=emulator.api_key, quiet=True, boot_timeout=60,
    ) as cluster:
        cluster.scale(1)
        row = wait_until(lambda: next((r for r in cluster.instances if r["state"] == "failed"), None),
                         60, "the instance to fail")
        assert "OCI runtime create failed" in row["reason"] and row["id"] is not None
        assert "failed" in cluster._repr_html_() and "OCI runtime" in cluster._repr_html_()
        assert "1 failed" in cluster._repr_html_()
    assert emulator.instances() == []

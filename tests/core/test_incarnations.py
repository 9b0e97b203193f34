"""The worker incarnations an instance writes, from its probe and its rental, without a network.

``VastInstance._incarnations`` turns what the box reports (``nvidia-smi``, cores, memory)
and what was rented (the offer) into one incarnation per worker: which GPUs it sees, what
resources it advertises, its threads and memory limit. Everything it reads is built here
directly: a :class:`Pool` from a shape, a :class:`RentalRecord` with an :class:`Offer`, and
a context holding only the fields an incarnation copies.
"""

from __future__ import annotations

import types
from typing import Any

import pytest

from dask_vastai import BootFailed
from dask_vastai.instance import VastInstance
from dask_vastai.pools import POOL_RESOURCE_CAPACITY, Pool, PoolShape
from dask_vastai.rentals import RentalRecord
from dask_vastai.roles import ROSTER_ENV, WORKER_ARGS, WORKER_CLIENTS_ENV
from dask_vastai.vast import Offer

GiB = 2**30


def _pool(num_gpus: int = 2, **shape: Any) -> Pool:
    return Pool.from_shape("a", PoolShape(gpu="RTX_3090", num_gpus=num_gpus, **shape), onstart="true")


def _record(num_gpus: int = 2, cpu_cores: float = 16, cpu_ram_mb: float = 65536) -> RentalRecord:
    offer = Offer.from_json({"id": 1000001, "gpu_name": "RTX 3090", "num_gpus": num_gpus,
                             "cpu_cores_effective": cpu_cores, "cpu_ram": cpu_ram_mb, "dph_total": 0.5})
    return RentalRecord(instance_id=42, worker_name="w", offer=offer, dph_total=0.5, rented_at=0.0)


def _context(environment: object | None = None) -> types.SimpleNamespace:
    """The fields of ``ClusterContext`` an incarnation is built from (no broker, no hub)."""
    return types.SimpleNamespace(
        env={"SECRET_TOKEN": "from-the-cluster", "PYTHONPATH": "cluster"},
        scheduler_address="tls://127.0.0.1:8786",
        certificates=types.SimpleNamespace(ca_pem="CA"),
        worker_clients=False,
        environment=environment,
    )


def _instance(pool: Pool, context: types.SimpleNamespace | None = None) -> VastInstance:
    return VastInstance("tls://127.0.0.1:8786", "w", context=context or _context(), pool=pool, group=pool.group())


def _probe(gpu_indexes: list[int], cpus: float | None = 8, memory_bytes: int | None = 32 * GiB) -> dict[str, Any]:
    gpus = [{"index": i, "name": "NVIDIA GeForce RTX 3090", "memory_mb": 24576, "uuid": f"GPU-{i}"}
            for i in gpu_indexes]
    return {"gpus": gpus, "cpus": cpus, "memory_bytes": memory_bytes, "executable": "/opt/py/bin/python3"}


def test_one_worker_per_gpu_sees_its_own_gpu_and_a_share_of_the_box() -> None:
    pool = _pool(num_gpus=2, worker_per_gpu=True)
    incs = _instance(pool)._incarnations(_probe([0, 1]), _record(num_gpus=2))
    assert [inc.worker_name for inc in incs] == ["w-gpu0", "w-gpu1"]
    assert [inc.env["CUDA_VISIBLE_DEVICES"] for inc in incs] == ["0", "1"]
    for inc in incs:
        assert inc.resources == {"GPU": 1.0, "CPU": 4.0, "MEMORY": float(16 * GiB), "pool-a": POOL_RESOURCE_CAPACITY}
        assert (inc.nthreads, inc.memory_limit) == (4, 16 * GiB)
        assert inc.scheduler_address == "tls://127.0.0.1:8786"
        # The cluster CA's certificate; the worker's own is minted with its ports, later.
        assert (inc.tls_ca, inc.tls_cert, inc.tls_key) == ("CA", "", "")
        assert inc.extra_args == WORKER_ARGS  # every worker and nanny checks its peers' roles
        assert (inc.worker_port, inc.nanny_port) == (0, 0)  # fresh ports come later, per incarnation
        assert inc.death_timeout_s == 60
        assert inc.python is None  # no environment step: the image's interpreter


def test_gpus_are_named_by_their_nvidia_smi_index() -> None:
    incs = _instance(_pool(num_gpus=2, worker_per_gpu=True))._incarnations(_probe([3, 5]), _record(num_gpus=2))
    assert [inc.env["CUDA_VISIBLE_DEVICES"] for inc in incs] == ["3", "5"]


def test_one_worker_for_all_gpus_holds_them_all_and_the_whole_box() -> None:
    (inc,) = _instance(_pool(num_gpus=2, worker_per_gpu=False))._incarnations(_probe([0, 1]), _record(num_gpus=2))
    assert inc.worker_name == "w"
    assert inc.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert inc.resources == {"GPU": 2.0, "CPU": 8.0, "MEMORY": float(32 * GiB), "pool-a": POOL_RESOURCE_CAPACITY}
    assert (inc.nthreads, inc.memory_limit) == (8, 32 * GiB)


def test_a_box_with_more_gpus_than_rented_shows_only_the_rented_ones() -> None:
    (inc,) = _instance(_pool(num_gpus=2, worker_per_gpu=False))._incarnations(_probe([0, 1, 2, 3]), _record(num_gpus=2))
    assert inc.env["CUDA_VISIBLE_DEVICES"] == "0,1" and inc.resources["GPU"] == 2.0


def test_a_single_gpu_instance_has_one_worker_under_the_instance_name() -> None:
    pool = _pool(num_gpus=1)
    assert pool.group() is None
    (inc,) = _instance(pool)._incarnations(_probe([0]), _record(num_gpus=1))
    assert inc.worker_name == "w" and inc.env["CUDA_VISIBLE_DEVICES"] == "0"
    assert inc.resources["GPU"] == 1.0 and inc.resources["CPU"] == 8.0


def test_every_worker_gets_at_least_one_core_and_thread() -> None:
    incs = _instance(_pool(num_gpus=2))._incarnations(_probe([0, 1], cpus=1), _record(num_gpus=2))
    assert [(inc.resources["CPU"], inc.nthreads) for inc in incs] == [(1.0, 1), (1.0, 1)]


def test_without_cpus_and_memory_in_the_probe_the_offer_says_what_the_box_has() -> None:
    record = _record(num_gpus=2, cpu_cores=12, cpu_ram_mb=49152)
    incs = _instance(_pool(num_gpus=2))._incarnations(_probe([0, 1], cpus=None, memory_bytes=None), record)
    for inc in incs:
        assert inc.resources["CPU"] == 6.0 and inc.resources["MEMORY"] == float(24 * GiB)
        assert inc.memory_limit == 24 * GiB


def test_worker_options_override_threads_memory_and_add_resources() -> None:
    options = {"nthreads": 2, "memory_limit": 5 * GiB, "resources": {"TPU": 1.0}, "death_timeout": 15}
    incs = _instance(_pool(num_gpus=2, worker_options=options))._incarnations(_probe([0, 1]), _record(num_gpus=2))
    for inc in incs:
        assert (inc.nthreads, inc.memory_limit, inc.death_timeout_s) == (2, 5 * GiB, 15)
        # the measured share still describes the box; the option adds to it
        assert inc.resources == {"GPU": 1.0, "CPU": 4.0, "MEMORY": float(16 * GiB),
                                 "pool-a": POOL_RESOURCE_CAPACITY, "TPU": 1.0}


def test_env_is_the_clusters_then_the_shipped_then_the_gpu() -> None:
    shipped = {"PYTHONPATH": "shipped", "CUDA_VISIBLE_DEVICES": "7"}
    incs = _instance(_pool(num_gpus=2))._incarnations(_probe([0, 1]), _record(num_gpus=2), shipped)
    # tells the workers whether tasks may act as clients, and to take worker peers only from the
    # scheduler's live-worker list
    policy = {WORKER_CLIENTS_ENV: "False", ROSTER_ENV: "1"}
    assert [inc.env for inc in incs] == [
        {"SECRET_TOKEN": "from-the-cluster", "PYTHONPATH": "shipped", "CUDA_VISIBLE_DEVICES": "0", **policy},
        {"SECRET_TOKEN": "from-the-cluster", "PYTHONPATH": "shipped", "CUDA_VISIBLE_DEVICES": "1", **policy},
    ]


def test_with_an_environment_step_workers_run_the_probed_interpreter() -> None:
    context = _context(environment=object())
    incs = _instance(_pool(num_gpus=2), context)._incarnations(_probe([0, 1]), _record(num_gpus=2))
    assert [inc.python for inc in incs] == ["/opt/py/bin/python3"] * 2


@pytest.mark.parametrize(("seen", "probe"), [(1, _probe([0])), (0, {"cpus": 8, "memory_bytes": GiB})])
def test_fewer_gpus_than_rented_fail_the_boot(seen: int, probe: dict[str, Any]) -> None:
    with pytest.raises(BootFailed, match=rf"instance 42 shows {seen} GPU\(s\) in nvidia-smi but 2 were rented"):
        _instance(_pool(num_gpus=2))._incarnations(probe, _record(num_gpus=2))

"""Pure pool logic: shapes and their options, a pool's ``could_run``, worker specs, the PoolSet."""

from __future__ import annotations

import dataclasses
import inspect

import dask.config
import pytest

from dask_vastai.pools import (
    DEFAULT_POOL,
    Pool,
    PoolSet,
    PoolShape,
    instance_worker_names,
    make_worker_spec,
)


def _pool(name: str = "p", **shape) -> Pool:
    return Pool.from_shape(name, PoolShape(**shape), onstart="true")


def test_every_shape_option_has_a_default_in_the_yaml_and_a_doc() -> None:
    for f in dataclasses.fields(PoolShape):
        key = f"vastai.{f.name.replace('_', '-')}"
        assert dask.config.get(key, default="missing") != "missing", key
        assert len(f.metadata["doc"]) > 10, f.name


def test_the_cluster_and_add_pool_take_exactly_the_shape_options() -> None:
    from dask_vastai import VastAICluster

    shape = set(PoolShape.option_names())
    cluster_params = set(inspect.signature(VastAICluster).parameters)
    assert shape <= cluster_params
    assert shape <= set(inspect.signature(VastAICluster.add_pool).parameters)
    for name in shape:
        assert f"{name}:" in (VastAICluster.__doc__ or ""), name


def test_an_unknown_option_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"pool 'x': unknown option\(s\) \['gpus'\]; known: .*num_gpus"):
        PoolShape.from_options({"gpus": 2}, where="pool 'x'")


def test_defaults_come_from_the_config_and_explicit_values_win() -> None:
    with dask.config.set({"vastai.disk": 80, "vastai.reliability": 0.9}):
        pool = _pool(gpu="RTX_4090", reliability=0.99)
    assert pool.requirements.disk_gb == 80
    assert pool.requirements.reliability == 0.99
    assert pool.create_request.disk_gb == 80
    assert pool.requirements.gpu == "RTX_4090"


def test_bad_values_fail_with_the_value_named() -> None:
    with pytest.raises(ValueError, match="RTX_3900"):
        _pool(gpu="RTX_3900")
    with pytest.raises(ValueError, match="num_gpus=0"):
        _pool(num_gpus=0)
    with pytest.raises(ValueError, match="pool name 'a b'"):
        _pool("a b")
    with pytest.raises(ValueError, match=r"secret env entries \['TOKEN'\]"):
        from dask_vastai import Secret

        _pool(env={"TOKEN": Secret("x")})


@pytest.mark.parametrize(
    ("shape", "restrictions", "ok"),
    [
        ({}, {"GPU": 1}, True),
        ({}, {"GPU": 2}, False),                                      # one GPU per worker
        ({"num_gpus": 2, "worker_per_gpu": False}, {"GPU": 2}, True),  # one worker holds both
        ({"num_gpus": 2}, {"GPU": 2}, False),                          # a worker per GPU
        ({}, {"CPU": 64, "MEMORY": 1e12}, True),                       # known only once rented
        ({}, {"pool-p": 1}, True),
        ({}, {"pool-other": 1}, False),
        ({}, {"TPU": 1}, False),
        ({"worker_options": {"resources": {"TPU": 1}}}, {"TPU": 1}, True),
    ],
)
def test_could_run(shape, restrictions, ok) -> None:
    assert _pool("p", **shape).could_run(restrictions) is ok


def test_worker_spec_of_a_multi_gpu_instance_is_a_group() -> None:
    single = make_worker_spec(_pool(), object, context="ctx")
    assert "group" not in single and single["options"] == {"context": "ctx", "pool": single["options"]["pool"]}
    multi = make_worker_spec(_pool(num_gpus=4), object, context=None)
    assert multi["group"] == ["-gpu0", "-gpu1", "-gpu2", "-gpu3"]
    assert instance_worker_names("c-0", multi) == ["c-0-gpu0", "c-0-gpu1", "c-0-gpu2", "c-0-gpu3"]
    assert instance_worker_names("c-0", single) == ["c-0"]
    one_worker = make_worker_spec(_pool(num_gpus=4, worker_per_gpu=False), object, context=None)
    assert "group" not in one_worker


def test_pool_set_names_counts_and_plans() -> None:
    pools = PoolSet("c", onstart="true")
    pools.add(DEFAULT_POOL, PoolShape())
    pools.add("big", PoolShape(num_gpus=2))
    with pytest.raises(ValueError, match="exists already"):
        pools.add("big", PoolShape())
    with pytest.raises(ValueError, match=r"pool='nope' does not exist; pools: \['big', 'default'\]"):
        pools.get("nope")
    assert pools.get() is pools.default
    names = [pools.new_instance_name(DEFAULT_POOL), pools.new_instance_name("big"), pools.new_instance_name("big")]
    assert names == ["c-0", "c-big-0", "c-big-1"]
    specs = {
        "c-0": make_worker_spec(pools.default, object, None),
        "c-big-0": make_worker_spec(pools["big"], object, None),
        "c-big-1": make_worker_spec(pools["big"], object, None),
    }
    assert pools.instances_of("big", specs) == ["c-big-0", "c-big-1"]
    # A 2-GPU pool plans 2 GPUs per instance, not the default pool's 1.
    assert pools.planned_gpus(specs) == {"default": 1, "big": 4}


def test_boot_failures_are_recorded_once_per_pool_and_reset_by_a_success() -> None:
    pools = PoolSet("c", onstart="true")
    pools.add(DEFAULT_POOL, PoolShape())
    error = RuntimeError("OCI runtime create failed")
    pools.record_boot("c-0", DEFAULT_POOL, error)
    pools.record_boot("c-1", DEFAULT_POOL, error)
    assert pools.failures_in_a_row(DEFAULT_POOL) == 2
    assert pools.boot_errors == {"c-0": error, "c-1": error}
    pools.record_boot("c-2", DEFAULT_POOL, None)
    assert pools.failures_in_a_row(DEFAULT_POOL) == 0


def test_scale_spellings_count_instances_and_workers_round_up_to_whole_instances() -> None:
    from dask_vastai.pools import instances_wanted

    assert instances_wanted(3) == instances_wanted(None, instances=3) == instances_wanted(None, jobs=3) == 3
    assert instances_wanted(None) == 0
    assert instances_wanted(None, workers=6, workers_per_instance=4) == 2  # 8 workers on 2 whole instances
    assert instances_wanted(None, workers=8, workers_per_instance=4) == 2
    with pytest.raises(ValueError, match=r"scale\(n=2, workers=4\): give one of"):
        instances_wanted(2, workers=4)
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="give a whole number"):
            instances_wanted(bad)

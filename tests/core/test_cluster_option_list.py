"""VastAICluster's own options are written once (``ClusterArguments``): each appears once in the
signature and the docs that ``help()`` and notebooks show, with its type, and reaches
``ClusterOptions.read``; a misspelt one fails at once, naming it and the option meant."""

from __future__ import annotations

import dataclasses
import inspect
import pydoc
from typing import Any

import pytest

from dask_vastai import VastAICluster
from dask_vastai.cluster_options import ClusterArguments, ClusterOptions
from dask_vastai.pools import PoolShape


def _fields() -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(ClusterArguments))


def test_every_option_is_in_the_signature_once_with_its_type_and_default() -> None:
    params = inspect.signature(VastAICluster).parameters
    names = list(params)
    assert len(names) == len(set(names))
    assert names[:2] == ["gpu", "n"]  # VastAICluster("RTX_3090", 2) as in every example
    for f in _fields():
        assert f.name in params, f.name
        assert params[f.name].annotation == f.type, f.name
        assert params[f.name].default == f.default, f.name
    for name in PoolShape.option_names():
        assert name in params, name
    assert {"asynchronous", "loop"} <= set(names)
    # no option is both the cluster's and a shape's: one home each
    assert not {f.name for f in _fields()} & set(PoolShape.option_names())


def test_every_option_is_documented_once_in_help() -> None:
    text = pydoc.render_doc(VastAICluster, renderer=pydoc.plaintext)
    for f in _fields():
        assert text.count(f"\n |  {f.name}:\n") == 1, f.name
        assert f.metadata["doc"].split()[0] in text, f.name
    assert "CLUSTER_OPTIONS" not in text and "SHAPE_OPTIONS" not in text


class _Recording:
    """ClusterArguments that note which options are read."""

    def __init__(self, arguments: ClusterArguments) -> None:
        self._arguments, self.read = arguments, set()

    def __getattr__(self, name: str) -> Any:
        self.read.add(name)
        return getattr(self._arguments, name)


def test_every_option_reaches_cluster_options_read() -> None:
    arguments, shape = ClusterArguments.from_call(
        ("RTX_3090", 2), {"boot_timeout": 123, "name": "listed", "quiet": True, "silence_logs": "error",
                          "api_key": "k", "api_url": "http://127.0.0.1:9", "max_price": 0.5},
        also=("asynchronous", "loop"),
    )
    assert shape == {"gpu": "RTX_3090", "max_price": 0.5}
    recording = _Recording(arguments)
    options = ClusterOptions.read(recording, shape)  # type: ignore[arg-type]
    assert recording.read == {f.name for f in _fields()}, "an option nobody reads"
    assert (options.initial_n, options.boot_timeout_s, options.name) == (2, 123.0, "listed")
    assert (options.quiet, options.silence_logs) == (True, "error")
    assert options.pools.default.requirements.gpu == "RTX_3090"
    assert options.pools.default.requirements.max_price == 0.5


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(ClusterArguments)])
def test_each_option_given_by_name_is_sorted_to_the_cluster(field: str) -> None:
    value = object()
    arguments, shape = ClusterArguments.from_call((), {field: value})
    assert getattr(arguments, field) is value
    assert shape == {}


def test_a_misspelt_option_fails_before_anything_naming_it_and_the_one_meant() -> None:
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['n_worker'\] \('n_worker': did you mean 'n_workers'\?\)"):
        VastAICluster(n_worker=1)
    with pytest.raises(ValueError, match=r"'max_prize': did you mean 'max_price'\?"):
        VastAICluster("RTX_3090", max_prize=0.4)
    with pytest.raises(ValueError, match=r"did you mean 'asynchronous'"):
        VastAICluster(asynchronus=True)


def test_too_many_positional_options_say_which_go_by_position() -> None:
    with pytest.raises(TypeError, match="only gpu and n may be given by position"):
        VastAICluster("RTX_3090", 1, 2)
    with pytest.raises(TypeError, match="multiple values for argument 'n'"):
        VastAICluster("RTX_3090", 1, n=2)


def test_the_arguments_as_given_show_no_secret() -> None:
    arguments, _ = ClusterArguments.from_call((), {"api_key": "sekrit-key", "secret_env": {"T": "sekrit-env"}})
    for text in (repr(arguments), str(arguments)):
        assert "sekrit" not in text, text

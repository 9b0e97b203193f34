"""Bad inputs fail within 5 s, naming the value, with nothing rented.

Ten of them (unknown GPU, negative n, zero price, impossible task resources, wrong key, an
unreachable URL, a malformed query, an unknown region, a negative disk, an invalid image
name), on the emulator with Vast's rate limits; the unreachable URL both as a refused
connection and as an unknown host (resolved through ``vastai.testing.hosts``, a table this
test controls, not the machine's DNS). The default image, Vast's ``:@vastai-automatic-tag``
form and ordinary names are accepted.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import dask.config
import pytest

from dask_vastai import VastAICluster
from dask_vastai.images import image_name_problem

LIMIT_S = 5.0

GOOD_IMAGES = [
    "vastai/pytorch:@vastai-automatic-tag",
    "vastai/pytorch",
    "pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime",
    "nvcr.io/nvidia/pytorch:24.08-py3",
    "localhost:5000/team/img:v1",
    "ubuntu@sha256:" + "a" * 64,
    "ghcr.io/org/my_img__x:latest",
]
BAD_IMAGES = [
    "vastai/pytorch:latest with space",
    "VastAI/PyTorch",
    "vastai/pytorch:",
    "vastai//pytorch",
    "vastai/pytorch:@not-vast-form",
    ":tag",
    "",
    "img:" + "t" * 200,
]


def _make(emu: Any, **kwargs: Any) -> VastAICluster:
    return VastAICluster(**{"api_url": emu.url, "api_key": emu.api_key, "quiet": True, **kwargs})


def _fails_fast(emu: Any, named: str, error: type[BaseException] = Exception, **kwargs: Any) -> str:
    """Construct with ``kwargs``: it must raise within 5 s naming ``named``, and rent nothing."""
    started = time.monotonic()
    with pytest.raises(error) as caught:
        _make(emu, **kwargs).close()
    took = time.monotonic() - started
    text = str(caught.value)
    assert named in text, text
    assert took < LIMIT_S, (took, text)
    assert emu.instances() == []
    return text


@pytest.mark.parametrize("image", GOOD_IMAGES)
def test_good_image_names_pass_the_grammar(image: str) -> None:
    assert image_name_problem(image) is None


@pytest.mark.parametrize("image", BAD_IMAGES)
def test_bad_image_names_fail_the_grammar(image: str) -> None:
    assert image_name_problem(image) is not None


def test_the_default_image_is_accepted(emulator_rate_limited: Any) -> None:
    with _make(emulator_rate_limited, gpu="RTX_3090", n=0) as cluster:
        assert cluster.pools.default.create_request.image == "vastai/pytorch:@vastai-automatic-tag"


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"gpu": "RTX_3900", "n": 1}, "RTX_3900"),
        ({"gpu": "RTX_3090", "n": -1}, "n=-1"),
        ({"gpu": "RTX_3090", "n": 1, "max_price": 0}, "max_price=0"),
        ({"gpu": "RTX_3090", "n": 1, "query": "gpu_name="}, "gpu_name="),
        ({"gpu": "RTX_3090", "n": 1, "region": "MARS"}, "MARS"),
        ({"gpu": "RTX_3090", "n": 1, "disk": -5}, "disk"),
        ({"gpu": "RTX_3090", "n": 1, "image": "vastai/pytorch:latest with space"}, "'vastai/pytorch:latest with space'"),
        ({"gpu": "RTX_3090", "n": 1, "image": "VastAI/PyTorch"}, "VastAI/PyTorch"),
    ],
)
def test_bad_option_fails_within_5s_named(emulator_rate_limited: Any, kwargs: dict[str, Any], named: str) -> None:
    _fails_fast(emulator_rate_limited, named, **kwargs)


def test_wrong_key_fails_within_5s(emulator_rate_limited: Any) -> None:
    text = _fails_fast(emulator_rate_limited, "key", api_key="not-the-key-12345", gpu="RTX_3090", n=1)
    assert "not-the-key-12345" not in text


def test_refused_connection_fails_within_5s_with_the_url(emulator_rate_limited: Any) -> None:
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        text = _fails_fast(emulator_rate_limited, url, api_url=url, gpu="RTX_3090", n=1)
    assert "refused" in text, text


def test_unknown_host_fails_within_5s_with_the_url(emulator_rate_limited: Any) -> None:
    url = "https://vast.invalid.example"
    # the emulator's own host resolves, the API's host is unknown to this table
    with dask.config.set({"vastai.testing.hosts": {"localhost": "127.0.0.1"}}):
        text = _fails_fast(emulator_rate_limited, url, api_url=url, gpu="RTX_3090", n=1)
    assert "unknown" in text and "vast.invalid.example" in text, text
    assert "hosts table" in text, text  # resolved by the test's table, not the machine's DNS


def test_impossible_task_resources_fail_within_5s_named(emulator_rate_limited: Any) -> None:
    from distributed import Client

    from dask_vastai.exceptions import ImpossibleResources

    with _make(emulator_rate_limited, gpu="RTX_3090", n=0) as cluster, Client(cluster) as client:
        started = time.monotonic()
        future = client.submit(sum, [1, 2], resources={"GPU": 9})
        with pytest.raises(ImpossibleResources) as caught:
            future.result(timeout=LIMIT_S)
        assert time.monotonic() - started < LIMIT_S
        assert "GPU=9" in str(caught.value)
    assert emulator_rate_limited.instances() == []

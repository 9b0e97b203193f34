"""Test hooks, switched on through ``dask.config``; absent by default, and then they do nothing.

Shipped with the package because the workers on the instances import it: the preload below,
and a function that a test runs there. None of this is a user's option (the keys are not in
``vastai.yaml``):

* ``vastai.testing.probe-versions``: ``{"python" or a distribution: version}`` that the probe
  on the instance reports instead of the truth: an instance with another Python, or with a
  ``distributed`` that an install does not fix.
* ``vastai.testing.worker-versions``: versions that the workers report when they register
  (the probe stays truthful), so that the scheduler's version gate can be seen refusing them.

* ``vastai.testing.hosts``: ``{host name: address or None}`` that the Vast client resolves
  names with instead of DNS (a hosts file of its own); a name absent or None is unknown, so a
  test meets an unknown host without asking the machine's resolver.

The first two are read when an instance boots, so they apply to the clusters booting while they are
set::

    with dask.config.set({"vastai.testing.worker-versions": {"msgpack": "0.6.0"}}):
        VastAICluster(...)  # its worker registers with msgpack 0.6.0 and is refused
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import dask.config

PROBE_VERSIONS = "vastai.testing.probe-versions"
HOSTS = "vastai.testing.hosts"
WORKER_VERSIONS = "vastai.testing.worker-versions"
#: How the worker hook reaches a worker's process on the instance: in its incarnation's env,
#: which dask reads into that process's config (``DASK_A__B`` is ``a.b``).
WORKER_VERSIONS_ENV = "DASK_VASTAI__TESTING__WORKER_VERSIONS"


def _versions(key: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in dict(dask.config.get(key, default=None) or {}).items()}


def hosts() -> dict[str, str | None] | None:
    """The hosts table names are resolved from instead of DNS (None: the hook is off)."""
    table = dask.config.get(HOSTS, default=None)
    return None if table is None else {str(k): (None if v is None else str(v)) for k, v in dict(table).items()}


def probe_versions() -> dict[str, str]:
    """What the probe on the instance reports instead of its own versions ({}: the truth)."""
    return _versions(PROBE_VERSIONS)


def after_install(versions: Mapping[str, str | None]) -> dict[str, str | None]:
    """The versions an install reported, as the probe hook's instance has them.

    Its fake versions (Python's aside) stay, as on an image where the install did not take.
    """
    fake = {k: v for k, v in probe_versions().items() if k != "python"}
    return {**versions, **fake}


def worker_env() -> dict[str, str]:
    """What the worker hook adds to the environment of each worker on the instance ({}: off)."""
    fake = _versions(WORKER_VERSIONS)
    if not fake:
        return {}
    # dask reads DASK_* values with ast.literal_eval: a dict's repr comes back as the dict
    return {WORKER_VERSIONS_ENV: repr(fake), "DASK_DISTRIBUTED__WORKER__PRELOAD": repr([__name__])}


def dask_setup(worker: Any) -> None:
    """Worker preload (``--preload dask_vastai._testing``): report the hook's versions, if set.

    With ``vastai.testing.worker-versions`` in the worker's config, the worker registers with
    those versions, so the scheduler's ``VersionGate`` can be seen refusing it.
    """
    fake = _versions(WORKER_VERSIONS)
    if not fake:
        return
    import distributed.versions
    import distributed.worker

    real = distributed.versions.get_versions

    def get_versions(packages: Iterable[str] | None = None) -> dict[str, Any]:
        out = real(packages)
        out["packages"] = {**out["packages"], **fake}
        return out

    distributed.worker.get_versions = get_versions  # type: ignore[attr-defined]


def remote_square(x: float) -> float:
    """A module-level function of dask-vastai: a worker can run it only if dask-vastai reached it."""
    return x * x


#: ``{"path": workdir-relative input, "index": chunk}``: the Snakemake plugin's stager puts that
#: chunk's bytes with one byte flipped the first time it sends it (a holder that corrupts, or a
#: chunk lost in transit), so that the worker's check and the single chunk's resend can be seen.
STAGING_CORRUPT_CHUNK = "vastai.testing.staging-corrupt-chunk"


def staging_corrupt_chunk() -> tuple[str, int] | None:
    """(path, chunk index) the stager corrupts on its first send, or None (off)."""
    spec = dask.config.get(STAGING_CORRUPT_CHUNK, default=None)
    if not spec:
        return None
    return str(spec["path"]), int(spec["index"])

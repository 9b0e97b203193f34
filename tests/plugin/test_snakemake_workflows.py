"""Snakemake's own executor-plugin suite (``TestWorkflowsLocalStorageBase``) with ``vastaidask``.

The base class passes ``workdir=tmp_path``, which reaches the job command as ``--directory``;
the executor strips it, so these tests only pass when staging really moves every file (the
workers run in their own scratch directories under the cache, not in ``tmp_path``).
"""

from __future__ import annotations

import sys

import pytest

from tests.helpers.checkout import REPO

# snakemake finds executor plugins by scanning sys.path (an import-hook editable install is
# invisible to that scan); this must happen before snakemake builds its plugin registry.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import snakemake.common.tests  # noqa: E402

from snakemake_executor_plugin_vastaidask import ExecutorSettings  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def _pool_address(tmp_path_factory):
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=2, processes=True, dashboard_address=":0",
        resources={"GPU": 1, "CPU": 4, "MEMORY": 8e9},
    ) as cluster:
        yield cluster.scheduler_address, tmp_path_factory.mktemp("worker-cache")


class TestWorkflows(snakemake.common.tests.TestWorkflowsLocalStorageBase):
    __test__ = True

    @pytest.fixture(autouse=True)
    def _attach(self, _pool_address):
        self._address, self._cache = _pool_address

    def get_executor(self) -> str:
        return "vastaidask"

    def get_executor_settings(self) -> ExecutorSettings:
        return ExecutorSettings(scheduler_address=self._address, worker_cache_dir=str(self._cache))

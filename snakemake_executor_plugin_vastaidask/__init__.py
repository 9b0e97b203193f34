"""Snakemake executor plugin ``vastaidask``: jobs on a warm pool of Dask workers (rented Vast.ai GPUs).

``snakemake --executor vastaidask --jobs 8`` rents instances with dask-vastai (or attaches to
an existing scheduler with ``--vastaidask-scheduler-address``), keeps them across jobs, and
moves sources, inputs and outputs over the Dask connection: no bucket, no shared filesystem.

Snakemake imports every installed plugin on every run, so this module stays light (no
distributed import) and its settings module keeps real (not string) annotations.
"""

from snakemake_interface_executor_plugins.settings import CommonSettings

from .executor import Executor
from .settings import ExecutorSettings

__all__ = ["Executor", "ExecutorSettings", "common_settings"]

# can_transfer_local_files: this plugin ships sources and inputs and brings outputs back
# itself, so core asks for no storage provider and uploads no source archive.
common_settings = CommonSettings(
    non_local_exec=True,
    implies_no_shared_fs=True,
    job_deploy_sources=True,
    can_transfer_local_files=True,
    auto_deploy_default_storage_provider=False,
    # Secrets travel inside the TLS Dask link in the task payload, never in the command text.
    pass_envvar_declarations_to_cmd=False,
    init_seconds_before_status_checks=0,
)

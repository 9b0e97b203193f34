# ruff: noqa: UP045  (snakemake hands these types to argparse, which knows Optional[X], not X | None)
"""The executor's settings: ``--vastaidask-*`` flags, ``SNAKEMAKE_VASTAIDASK_*`` env vars, profile keys.

Two traps of snakemake's settings machinery shape this module:

- No ``from __future__ import annotations`` here: snakemake imports every installed
  plugin and hands each field's *type* to argparse; string annotations break every
  ``snakemake`` run on the machine, whatever executor it uses.
- A bool field defaulting to True becomes an unprefixed ``--no-<field>`` flag that then
  fails; so every bool defaults to False and says ``no_xxx`` when it turns something off.

Defaults that describe a rental (GPU, price, image, ...) are None here and fall through
to dask-vastai's own defaults (``vastai.yaml``), so the one default stays in one place.
"""

from dataclasses import dataclass, field
from typing import Optional

from snakemake_interface_executor_plugins.settings import ExecutorSettingsBase

#: ``--vastaidask-network``'s values: dask-vastai's network modes
NETWORK_CHOICES = ["tunnel", "direct", "auto"]


@dataclass
class ExecutorSettings(ExecutorSettingsBase):
    """What a user of ``--executor vastaidask`` can set."""

    scheduler_address: Optional[str] = field(
        default=None,
        metadata={
            "help": "Use this existing Dask scheduler (tls://host:port, Vast or not; its certificates "
            "from the dask config distributed.comm.tls.*) instead of renting instances. Jobs that carry "
            "credentials (bucket storage, envvars) are refused over an unencrypted address. Its workers "
            "should advertise resources GPU, CPU and MEMORY (bytes), e.g. `dask worker --resources "
            "'GPU=1 CPU=8 MEMORY=32e9'`.",
            "env_var": True,
        },
    )
    gpu: Optional[str] = field(
        default=None,
        metadata={"help": "GPU model to rent for jobs that ask for a GPU, e.g. RTX_3090 "
                  "(default: dask-vastai's, any GPU).", "env_var": True},
    )
    num_gpus: Optional[int] = field(
        default=None, metadata={"help": "GPUs per rented instance (default 1)."}
    )
    min_instances: int = field(
        default=0, metadata={"help": "Instances kept rented while the workflow runs."}
    )
    max_instances: int = field(
        default=4, metadata={"help": "At most this many instances rented at once."}
    )
    max_price: Optional[float] = field(
        default=None, metadata={"help": "Dollars per hour per instance, at most (dph_total)."}
    )
    max_cost: Optional[float] = field(
        default=None,
        metadata={"help": "Dollars for the whole run, at most, as Vast's meter counts them: before they "
                  "are reached every instance is destroyed and the jobs still waiting fail "
                  "(default: no cap)."},
    )
    max_hourly: Optional[float] = field(
        default=None,
        metadata={"help": "Dollars per hour of all instances together, at most: an instance that "
                  "would pass it is not rented (default: no cap)."},
    )
    interruptible: Optional[str] = field(
        default=None,
        metadata={"help": "Rent interruptible instances: 'yes' bids (cheaper; an instance outbid is "
                  "destroyed and replaced, its jobs rerun), 'fallback' bids but rents on demand when no "
                  "interruptible offer matches or after repeated preemptions (vastai.interruptible-fallback), "
                  "'no' rents on demand (default: dask-vastai's, on demand)."},
    )
    bid: Optional[str] = field(
        default=None,
        metadata={"help": "Interruptible bid: '1.2x' bids 1.2 times each offer's min_bid, a number bids "
                  "that many $/h (dearer offers are skipped) (default: dask-vastai's, 1x)."},
    )
    region: Optional[str] = field(
        default=None, metadata={"help": "Region or country codes of the hosts, e.g. EU or DE,PL."}
    )
    image: Optional[str] = field(
        default=None, metadata={"help": "Docker image of the instances (default: dask-vastai's)."}
    )
    disk: Optional[float] = field(
        default=None,
        metadata={"help": "GB of disk per instance (default: dask-vastai's). A rule whose disk_mb "
                  "resource asks for more gets instances with that much."},
    )
    reliability: Optional[float] = field(
        default=None,
        metadata={"help": "Host reliability, at least, 0 to 1 (default: dask-vastai's, 0.98; "
                  "0 turns the filter off)."},
    )
    order: Optional[str] = field(
        default=None,
        metadata={"help": "The order offers are taken in, `vastai search offers` syntax (default "
                  "dph_total: cheapest first; e.g. 'dlperf_usd-' for deep-learning performance per dollar)."},
    )
    vastai_query: Optional[str] = field(
        default=None,
        metadata={"help": "Extra `vastai search offers` filters for every rental, e.g. "
                  "'cuda_max_good>=12.4 inet_down>500'."},
    )
    network: Optional[str] = field(
        default=None,
        metadata={"help": "How the workers reach each other and this machine: 'tunnel' (every "
                  "connection inside SSH; data between workers relays through this machine), 'direct' "
                  "(workers talk on the instances' mapped public ports with mutual TLS; only offers with "
                  "enough direct ports), 'auto' (direct where an instance's ports answer, else tunnel) "
                  "(default: the dask config's vastai.network).",
                  "choices": NETWORK_CHOICES},
    )
    no_datacenter: bool = field(
        default=False,
        metadata={"help": "Also rent from hobbyist (non-datacenter) hosts. Jobs' inputs and "
                  "credentials then reach less vetted machines."},
    )
    idle_timeout: Optional[int] = field(
        default=None,
        metadata={"help": "Seconds an instance may sit without work before it is destroyed "
                  "(default: as long as instances of its pool take to boot, the break-even "
                  "of paying idle seconds against boot seconds)."},
    )
    boot_timeout: Optional[int] = field(
        default=None, metadata={"help": "Seconds from rent to registered worker (default: dask-vastai's)."}
    )
    orphan_timeout: Optional[int] = field(
        default=None,
        metadata={"help": "Seconds after which an instance that lost this snakemake process (killed, "
                  "machine asleep) destroys itself (default: dask-vastai's)."},
    )
    api_url: Optional[str] = field(
        default=None, metadata={"help": "Vast API origin (default https://console.vast.ai; "
                                "`dask-vastai emulator` prints a local one).", "env_var": True},
    )
    api_key: Optional[str] = field(
        default=None,
        metadata={"help": "Vast API key; prefer the environment (SNAKEMAKE_VASTAIDASK_API_KEY or "
                  "VAST_API_KEY): a command line is visible to every user of the machine (default: "
                  "VAST_API_KEY, then the vastai CLI's key file).", "env_var": True},
    )
    keep_instances: bool = field(
        default=False,
        metadata={"help": "Do not shrink the pool below max-instances when idle (instances are "
                  "still destroyed when snakemake ends: the scheduler lives in this process)."},
    )
    cache_quota_gb: float = field(
        default=20.0,
        metadata={"help": "Disk a worker may use to keep staged sources, inputs and outputs "
                  "(least recently used evicted first)."},
    )
    no_keep_temp_remote: bool = field(
        default=False,
        metadata={"help": "Bring temp() outputs back to this machine like every other output. By default "
                  "they stay on the worker that made them (this machine gets a small stand-in file) and "
                  "the jobs that need them fetch them from there, worker to worker."},
    )
    chunk_mb: int = field(
        default=32,
        metadata={"help": "Input files larger than this many MB travel to the workers in chunks of this "
                  "size (each checked, a lost one sent again alone); the client holds about three "
                  "chunks in memory at a time. A job's outputs beyond this many MB in all stay on its "
                  "worker and are pulled back in chunks of this size the same way."},
    )
    worker_cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Cache directory on the workers (default ~/.cache/snakemake-vastaidask)."},
    )
    no_warm_start: bool = field(
        default=False,
        metadata={"help": "Start every job as a fresh `python -m snakemake` (2-3 s of imports "
                  "each) instead of forking it from the worker's warm runner, which imported "
                  "snakemake once. The job's log says which start it got."},
    )
    submit_margin: int = field(
        default=2,
        metadata={"help": "GPU jobs handed to Dask beyond the GPUs registered or booting, so "
                  "that the first instance to boot does not take every queued job."},
    )

"""The emulated marketplace's offers: the shipped catalog, a user's file, or a Python list.

An offer record has the fields Vast's search returns (``POST /api/v0/bundles/``), in
Vast's units: ``gpu_ram``/``cpu_ram``/``gpu_total_ram`` in MB, ``disk_space`` in GB,
``dph_base`` in $/h for the whole machine without storage, ``storage_cost`` in $/GB/month,
``duration`` in seconds. A partial record (a test's ``{"gpu_name": "RTX 3090",
"dph_base": 3.6}``) is completed with plausible defaults and the derived fields
(``gpu_total_ram``, ``ask_contract_id``, ``dlperf_per_dphtotal``, ...), so the CLI's
table always prints.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

#: What a partial record gets (a plain single-GPU datacenter RTX 3090 in the US).
OFFER_DEFAULTS: dict[str, Any] = {
    "gpu_name": "RTX 3090",
    "num_gpus": 1,
    "gpu_ram": 24576,
    "gpu_frac": 1.0,
    "gpu_arch": "nvidia",
    "compute_cap": 860,
    "total_flops": 35.6,
    "dlperf": 24.0,
    "cpu_name": "AMD EPYC 7543 32-Core Processor",
    "cpu_cores": 32,
    "cpu_cores_effective": 16.0,
    "cpu_ram": 65536,
    "cpu_arch": "amd64",
    "disk_space": 1000.0,
    "disk_bw": 3000.0,
    "disk_name": "Samsung SSD 980 PRO",
    "inet_up": 1000.0,
    "inet_down": 1000.0,
    "inet_up_cost": 0.0,
    "inet_down_cost": 0.0,
    "direct_port_count": 100,
    "public_ipaddr": "203.0.113.10",
    "static_ip": True,
    "dph_base": 0.25,
    "min_bid": 0.1,
    "storage_cost": 0.1,
    "reliability": 0.995,
    "verification": "verified",
    "verified": True,
    "hosting_type": 1,
    "geolocation": "Virginia, US",
    "cuda_max_good": 12.4,
    "driver_version": "550.127.05",
    "pci_gen": 4.0,
    "pcie_bw": 20.0,
    "has_avx": 1,
    "mobo_name": "ROMED8-2T",
    "os_version": "22.04",
    "ubuntu_version": "22.04",
    "vms_enabled": False,
    "cluster_id": None,
    "external": False,
    "rentable": True,
    "rented": False,
    "duration": 30 * 86400.0,
    "gpu_max_power": 350.0,
    "gpu_max_temp": 83.0,
    "gpu_mem_bw": 936.0,
    "gpu_display_active": False,
    "bw_nvlink": 0.0,
    "bundled_results": 1,
    "vericode": 0,
}

#: per-model facts a partial record gets from its gpu_name: gpu_ram MB, compute_cap, TFLOPS, DLPerf
GPU_MODELS: dict[str, tuple[int, int, float, float]] = {
    "RTX 3090": (24576, 860, 35.6, 24.0),
    "RTX 4090": (24564, 890, 82.6, 45.0),
    "RTX A6000": (49140, 860, 38.7, 27.0),
    "L40S": (46068, 890, 91.6, 48.0),
    "A100 PCIE": (40960, 800, 19.5, 60.0),
    "A100 SXM4": (81920, 800, 19.5, 70.0),
    "H100 SXM": (81559, 900, 67.0, 120.0),
}

#: hours in Vast's storage month: storage_cost ($/GB/month) * GB / this = $/h
HOURS_PER_MONTH = 720.0


def _default_catalog() -> list[dict[str, Any]]:
    text = resources.files("dask_vastai.emulator").joinpath("default_catalog.json").read_text()
    return json.loads(text)


def complete_offer(partial: Mapping[str, Any], offer_id: int) -> dict[str, Any]:
    """One full offer record from ``partial`` (its ``id`` wins over ``offer_id``)."""
    model = GPU_MODELS.get(str(partial.get("gpu_name", OFFER_DEFAULTS["gpu_name"])))
    by_model: dict[str, Any] = {}
    if model is not None:
        n = int(partial.get("num_gpus", 1))
        by_model = {"gpu_ram": model[0], "compute_cap": model[1], "total_flops": model[2] * n, "dlperf": model[3] * n}
    offer = {**OFFER_DEFAULTS, **by_model, **partial}
    offer["id"] = int(offer.get("id") or offer_id)
    offer.setdefault("ask_contract_id", offer["id"])
    offer.setdefault("bundle_id", offer["id"] + 50_000_000)
    offer.setdefault("machine_id", 20_000 + offer["id"] % 10_000)
    offer.setdefault("host_id", 300 + offer["id"] % 97)
    offer.setdefault("reliability2", offer["reliability"])
    offer.setdefault("geolocode", None)
    offer["gpu_total_ram"] = offer["gpu_ram"] * offer["num_gpus"]
    offer["verified"] = bool(offer.get("verified", offer.get("verification") == "verified"))
    offer["verification"] = "verified" if offer["verified"] else offer.get("verification", "unverified")
    if offer["verification"] == "verified" and not offer["verified"]:
        offer["verification"] = "unverified"
    # 'datacenter' is what the SDK derives from hosting_type; keep them one fact
    if "datacenter" in partial:
        offer["hosting_type"] = 1 if partial["datacenter"] else 0
    offer.pop("datacenter", None)
    offer["dph_base"] = float(offer["dph_base"])
    offer["min_bid"] = float(min(offer["min_bid"], offer["dph_base"]))
    return offer


def load_catalog(source: str | Path | Iterable[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Offers from the shipped default (None), a JSON file (path), or records (a list).

    Raises ValueError with the file and the problem when a file is not a JSON list of objects.
    """
    if source is None:
        records: Iterable[Mapping[str, Any]] = _default_catalog()
    elif isinstance(source, str | Path):
        path = Path(source)
        try:
            records = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read the offer catalog {path}: {e}. "
                             "Give a JSON list of offer objects (see dask_vastai/emulator/default_catalog.json).") from e
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError(f"the offer catalog {path} must be a JSON list of objects, one per offer; "
                             f"it holds a {type(records).__name__}.")
    else:
        records = source
    offers: list[dict[str, Any]] = []
    seen: set[int] = set()
    for index, record in enumerate(records):
        offer = complete_offer(record, 1_000_001 + index)
        while offer["id"] in seen:  # partial records without ids must not collide with given ones
            offer["id"] += 100_000
            offer["ask_contract_id"] = offer["id"]
        seen.add(offer["id"])
        offers.append(offer)
    return offers


def priced(offer: Mapping[str, Any], *, allocated_storage_gb: float, bid: bool) -> dict[str, Any]:
    """The offer as search shows it for a disk of ``allocated_storage_gb`` (on-demand or bid).

    ``dph_total = (min_bid if bid else dph_base) + storage_cost * GB / 720``: Vast prices the
    allocated disk by the hour the same way (its exact rounding is not public).
    """
    row = dict(offer)
    gpu_dph = row["min_bid"] if bid else row["dph_base"]
    storage_dph = row["storage_cost"] * allocated_storage_gb / HOURS_PER_MONTH
    total = gpu_dph + storage_dph
    row["is_bid"] = bid
    row["dph_total"] = round(total, 6)
    row["storage_total_cost"] = round(storage_dph, 6)
    row["dlperf_per_dphtotal"] = round(row["dlperf"] / total, 3) if total else 0.0
    row["flops_per_dphtotal"] = round(row["total_flops"] / total, 3) if total else 0.0
    row["score"] = round(row["dlperf_per_dphtotal"] * row["reliability"], 3)
    row["search"] = {"gpuCostPerHour": gpu_dph, "diskHour": storage_dph, "totalHour": total,
                     "discountTotalHour": 0.0, "discountedTotalPerHour": total}
    row["instance"] = dict(row["search"])
    return row

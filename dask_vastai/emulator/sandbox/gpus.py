"""Which GPUs an emulated instance sees: the host's real ones, or made-up ones.

Where the host has NVIDIA devices and a working ``nvidia-smi``, each instance gets its
own slice of them (the device nodes bound in, ``CUDA_VISIBLE_DEVICES`` naming their
UUIDs, the real ``nvidia-smi``). Elsewhere it gets a fake ``nvidia-smi`` reporting the
rented model and memory, as the host driver would print them.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass

CONTROL_DEVICES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")


@dataclass(frozen=True)
class HostGPU:
    index: int
    uuid: str
    name: str


def probe_host_gpus() -> list[HostGPU]:
    """The host's NVIDIA GPUs (blocking, run once at start-up); empty where none work."""
    if not glob.glob("/dev/nvidia[0-9]*") or not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,uuid,name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        index, gpu_uuid, name = (x.strip() for x in line.split(",", 2))
        gpus.append(HostGPU(int(index), gpu_uuid, name))
    return gpus


def driver_name(gpu_name: str) -> str:
    """How the driver names a marketplace model: "RTX_3090" -> "NVIDIA GeForce RTX 3090"."""
    name = gpu_name.replace("_", " ").strip()
    if name.upper().startswith("NVIDIA"):
        return name
    words = name.split()
    # GeForce models are numbered (3090, 4090 Ti); workstation ones are A6000, 6000 Ada, 4000 Ada
    consumer = words[0] in ("RTX", "GTX") and len(words) > 1 and words[1].isdigit() and not words[1].endswith("000")
    return ("NVIDIA GeForce " if consumer else "NVIDIA ") + name


def fake_gpus(instance_id: int, num_gpus: int, gpu_name: str, gpu_ram_mb: int) -> list[dict]:
    """What the fake ``nvidia-smi`` reports: one entry per rented GPU, stable UUIDs."""
    return [
        {
            "index": i,
            "name": driver_name(gpu_name),
            "memory_mb": int(gpu_ram_mb),
            "uuid": "GPU-" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"vast-emulator/{instance_id}/{i}")),
        }
        for i in range(num_gpus)
    ]


def device_nodes(gpus: list[HostGPU]) -> list[str]:
    """The /dev entries (names under /dev) an instance needs for its real GPUs."""
    nodes = [f"nvidia{g.index}" for g in gpus]
    nodes += [name for name in CONTROL_DEVICES if os.path.exists("/dev/" + name)]
    return nodes

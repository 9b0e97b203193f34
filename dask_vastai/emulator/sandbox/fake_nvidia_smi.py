"""A stand-in for ``nvidia-smi`` inside emulated instances (copied in, run as a script).

It reports the rented GPUs from ``/run/vast-emu/gpus.json`` the way the NVIDIA driver's
tool prints them: the default table, ``-L``, and ``--query-gpu=... --format=csv[,noheader]
[,nounits]`` (what Dask tooling and our bootstrap parse). Standard library only.
"""

import json
import sys

GPUS_FILE = "/run/vast-emu/gpus.json"
DRIVER_VERSION = "550.54.15"
CUDA_VERSION = "12.4"

# field -> (header, unit or "", getter)
FIELDS = {
    "index": ("index", "", lambda g: str(g["index"])),
    "name": ("name", "", lambda g: g["name"]),
    "gpu_name": ("name", "", lambda g: g["name"]),
    "uuid": ("uuid", "", lambda g: g["uuid"]),
    "gpu_uuid": ("uuid", "", lambda g: g["uuid"]),
    "memory.total": ("memory.total [MiB]", " MiB", lambda g: str(g["memory_mb"])),
    "memory.used": ("memory.used [MiB]", " MiB", lambda g: "1"),
    "memory.free": ("memory.free [MiB]", " MiB", lambda g: str(g["memory_mb"] - 1)),
    "utilization.gpu": ("utilization.gpu [%]", " %", lambda g: "0"),
    "utilization.memory": ("utilization.memory [%]", " %", lambda g: "0"),
    "temperature.gpu": ("temperature.gpu", "", lambda g: "34"),
    "driver_version": ("driver_version", "", lambda g: DRIVER_VERSION),
    "count": ("count", "", lambda g: str(g["count"])),
    "pci.bus_id": ("pci.bus_id", "", lambda g: f"00000000:{g['index'] + 1:02X}:00.0"),
    "power.draw": ("power.draw [W]", " W", lambda g: "21.00"),
    "compute_cap": ("compute_cap", "", lambda g: "8.6"),
}


def load() -> list[dict]:
    with open(GPUS_FILE) as f:
        gpus = json.load(f)
    for gpu in gpus:
        gpu["count"] = len(gpus)
    return gpus


def table(gpus: list[dict]) -> str:
    bar = "+-----------------------------------------------------------------------------------------+"
    lines = [
        bar,
        f"| NVIDIA-SMI {DRIVER_VERSION}              Driver Version: {DRIVER_VERSION}      CUDA Version: {CUDA_VERSION}     |",
        "|-----------------------------------------+------------------------+----------------------+",
        "| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |",
        "| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |",
        "|=========================================+========================+======================|",
    ]
    for g in gpus:
        bus = FIELDS["pci.bus_id"][2](g)
        lines.append(f"| {g['index']:>3}  {g['name'][:19]:<19}        On  | {bus:<16}  Off |                  N/A |")
        memory = f"1MiB / {g['memory_mb']}MiB"
        lines.append(f"|  0%   34C    P8             21W /  350W | {memory:>22} |      0%      Default |")
        lines.append("+-----------------------------------------+------------------------+----------------------+")
    lines += [
        "",
        bar,
        "| Processes:                                                                              |",
        "|  GPU   GI   CI        PID   Type   Process name                              GPU Memory |",
        "|=========================================================================================|",
        "|  No running processes found                                                             |",
        bar,
    ]
    return "\n".join(lines) + "\n"


def query(gpus: list[dict], fields: list[str], fmt: list[str]) -> str:
    unknown = [f for f in fields if f not in FIELDS]
    if unknown:
        raise SystemExit(f'Field "{unknown[0]}" is not a valid field to query.\n')
    rows = []
    if "noheader" not in fmt:
        rows.append(", ".join(FIELDS[f][0] if "nounits" not in fmt else FIELDS[f][0].split(" [")[0] for f in fields))
    for g in gpus:
        rows.append(", ".join(FIELDS[f][2](g) + ("" if "nounits" in fmt else FIELDS[f][1]) for f in fields))
    return "\n".join(rows) + "\n"


def main(argv: list[str]) -> int:
    gpus = load()
    opts: dict[str, str] = {}
    for arg in argv:
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            opts[key] = value
        elif arg in ("-L", "--list-gpus"):
            opts["list"] = ""
    if "id" in opts or "i" in opts:
        wanted = {x.strip() for x in opts.get("id", opts.get("i", "")).split(",")}
        gpus = [g for g in gpus if str(g["index"]) in wanted or g["uuid"] in wanted]
    if not gpus:
        sys.stderr.write("No devices were found\n")
        return 6
    if "list" in opts:
        sys.stdout.write("".join(f"GPU {g['index']}: {g['name']} (UUID: {g['uuid']})\n" for g in gpus))
    elif "query-gpu" in opts:
        fmt = [x.strip() for x in opts.get("format", "").split(",")]
        if "csv" not in fmt:
            sys.stderr.write("This query requires --format=csv\n")
            return 2
        try:
            sys.stdout.write(query(gpus, [x.strip() for x in opts["query-gpu"].split(",")], fmt))
        except SystemExit as exc:
            sys.stderr.write(str(exc))
            return 2
    else:
        sys.stdout.write(table(gpus))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""A stand-in for coreutils' ``nproc`` in instances whose CPU view is faked (copied in, run as a script).

The real ``nproc`` counts the CPUs the process may run on (its affinity), which a
sandbox cannot raise above the machine's own; this one counts the CPUs the instance's
``/sys/devices/system/cpu/online`` shows, as ``nproc`` on that bigger (or smaller) machine
would. It honours ``--all``, ``--ignore=N`` and ``OMP_NUM_THREADS``/``OMP_THREAD_LIMIT``
as coreutils does. Standard library only.
"""

import os
import sys

ONLINE = "/run/vast-emu/cpu_online"


def online_cpus() -> int:
    count = 0
    with open(ONLINE) as f:
        for part in f.read().strip().split(","):
            first, _, last = part.partition("-")
            count += int(last or first) - int(first) + 1
    return count


def omp_limit(name: str) -> int | None:
    value = os.environ.get(name, "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def main(argv: list[str]) -> int:
    ignore, all_cpus = 0, False
    args = iter(argv)
    for arg in args:
        if arg == "--all":
            all_cpus = True
        elif arg.startswith("--ignore="):
            ignore = int(arg.split("=", 1)[1])
        elif arg == "--ignore":
            ignore = int(next(args, "0"))
        elif arg == "--help":
            print("Usage: nproc [OPTION]...\nPrint the number of processing units available to the current process.")
            return 0
        elif arg == "--version":
            print("nproc (GNU coreutils) 9.1")
            return 0
        else:
            print(f"nproc: unrecognized option '{arg}'", file=sys.stderr)
            return 1
    count = online_cpus()
    if not all_cpus:
        count = omp_limit("OMP_NUM_THREADS") or count
        limit = omp_limit("OMP_THREAD_LIMIT")
        count = min(count, limit) if limit else count
    print(max(1, count - ignore))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

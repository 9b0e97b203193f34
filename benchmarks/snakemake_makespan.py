"""Makespan of 24 GPU jobs of 5 s with ``--jobs 4`` on instances that take 60 s to boot.

The emulator (real sandboxes, Vast's rate limits on) rents up to 4 RTX 3090 instances with
a 60 s boot delay. The ideal is 60 s of boot plus 6 waves of 5 s = 90 s; the printed ratio
is the measured makespan (snakemake start to exit, every rental destroyed) over it.

    python -m benchmarks.snakemake_makespan [jobs] [seconds] [boot_delay_s]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SNAKEFILE = """
rule all:
    input: expand("out/{{i}}.txt", i=range({jobs}))
rule work:
    output: "out/{{i}}.txt"
    resources: gpu=1
    shell: "sleep {seconds}; echo {{wildcards.i}} > {{output}}"
"""


def main(jobs: int, seconds: float, boot_delay_s: float) -> None:
    from dask_vastai.emulator import Emulator

    ideal = boot_delay_s + -(-jobs // 4) * seconds
    with tempfile.TemporaryDirectory() as tmp:
        wd = Path(tmp, "wf")
        wd.mkdir()
        (wd / "Snakefile").write_text(SNAKEFILE.format(jobs=jobs, seconds=seconds))
        with Emulator(runtime="sandbox", boot_delay_s=boot_delay_s, rate_limits=True,
                      state_dir=Path(tmp, "emu")) as emu:
            env = dict(os.environ, PYTHONPATH=str(REPO))
            t0 = time.perf_counter()
            p = subprocess.run(
                [sys.executable, "-m", "snakemake", "--executor", "vastaidask", "--jobs", "4",
                 "--vastaidask-api-url", emu.url, "--vastaidask-api-key", emu.api_key,
                 "--vastaidask-gpu", "RTX_3090", "--vastaidask-max-instances", "4",
                 "--vastaidask-boot-timeout", str(int(boot_delay_s) + 240)],
                cwd=wd, env=env, capture_output=True, text=True, timeout=1800,
            )
            makespan = time.perf_counter() - t0
            if p.returncode != 0:
                raise SystemExit(f"snakemake failed:\n{p.stderr[-4000:]}")
            left = emu.instances()
            rentals = emu.meter()["instances"]
        lines = [json.loads(x) for x in (wd / ".snakemake/vastaidask/transfers.jsonl").read_text().splitlines()]
    per_worker = Counter(t["worker_name"] for t in lines)
    print(f"{jobs} jobs x {seconds:g}s, --jobs 4, boot delay {boot_delay_s:g}s: makespan {makespan:.1f}s, "
          f"ideal {ideal:.0f}s, ratio {makespan / ideal:.2f}")
    print(f"instances rented: {len(rentals)}, left after: {len(left)}; jobs per worker: {dict(per_worker)}")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(int(a[0]) if a else 24, float(a[1]) if len(a) > 1 else 5.0, float(a[2]) if len(a) > 2 else 60.0)

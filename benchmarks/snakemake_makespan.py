"""Makespan of 24 GPU jobs of 5 s with ``--jobs 4`` on instances that take 60 s to boot (P1).

The emulator (real sandboxes, Vast's rate limits on) rents up to 4 RTX 3090 instances with
a 60 s boot delay. The ideal is 60 s of boot plus 6 waves of 5 s = 90 s. Printed, from
snakemake's start to its exit (every rental destroyed):

- the makespan and its ratio to the ideal;
- the work part: the makespan less (start -> first worker registered) less (last output on
  disk -> exit), against the ideal 6 x 5 s = 30 s. Registrations come from a scheduler
  preload (``benchmarks/registrations.py``), the last output from the outputs' mtimes (the
  executor stamps each as it lands);
- with ``--vastai-plugin``: the same workflow, in the same invocation, with the existing
  per-job plugin ``snakemake-executor-plugin-vastai`` (one instance rented per job,
  installed from the package index into a virtualenv of its own, pointed at a fresh
  emulator of the same settings through the ``VAST_URL`` its SDK reads), and the ratio.

    python -m benchmarks.snakemake_makespan [--jobs 24] [--seconds 5] [--boot 60] [--vastai-plugin]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from collections import Counter
from pathlib import Path

from benchmarks import registrations

REPO = Path(__file__).resolve().parents[1]
VASTAI_PLUGIN = "snakemake-executor-plugin-vastai==0.1.4"
VASTAI_PLUGIN_VENV = Path("~/.cache/dask-vastai/smk-vastai-plugin").expanduser()

SNAKEFILE = """
rule all:
    input: expand("out/{{i}}.txt", i=range({jobs}))
rule work:
    output: "out/{{i}}.txt"
    resources: gpu=1
    shell: "sleep {seconds}; echo {{wildcards.i}} > {{output}}"
"""


def vastai_plugin_python() -> Path:
    """A virtualenv (system site-packages: the same snakemake) with the per-job plugin from
    the package index; its SDK's exact pins stay out of our environment."""
    python = VASTAI_PLUGIN_VENV / "bin" / "python"
    marker = VASTAI_PLUGIN_VENV / (".installed-" + VASTAI_PLUGIN.replace("==", "-"))
    if not marker.exists():
        venv.EnvBuilder(system_site_packages=True, with_pip=True, clear=True).create(VASTAI_PLUGIN_VENV)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", VASTAI_PLUGIN],
                       check=True)
        marker.touch()
    return python


def workflow(root: Path, name: str, jobs: int, seconds: float) -> Path:
    wd = root / name
    wd.mkdir()
    (wd / "Snakefile").write_text(SNAKEFILE.format(jobs=jobs, seconds=seconds))
    return wd


class RunFailed(Exception):
    """A snakemake run exited non-zero; the message ends with its stderr."""


def timed(cmd: list[str], wd: Path, env: dict[str, str], timeout_s: float) -> tuple[float, float, float]:
    """(wall-clock start, exit, last output's mtime) of a snakemake run that must succeed."""
    t0 = time.time()
    p = subprocess.run(cmd, cwd=wd, env=env, capture_output=True, text=True, timeout=timeout_s)
    t1 = time.time()
    if p.returncode != 0:
        raise RunFailed(f"{' '.join(cmd[:5])} failed after {t1 - t0:.0f}s:\n{p.stderr[-3000:]}")
    last_output = max(f.stat().st_mtime for f in (wd / "out").glob("*.txt"))
    return t0, t1, last_output


def ours(root: Path, jobs: int, seconds: float, boot_s: float) -> dict:
    from dask_vastai.emulator import Emulator

    wd = workflow(root, "vastaidask", jobs, seconds)
    probe = root / "registrations.jsonl"
    env = dict(os.environ, PYTHONPATH=str(REPO),
               DASK_DISTRIBUTED__SCHEDULER__PRELOAD='["benchmarks.registrations"]',
               **{registrations.ENV: str(probe)})
    with Emulator(runtime="sandbox", boot_delay_s=boot_s, rate_limits=True, state_dir=root / "emu") as emu:
        t0, t1, last = timed(
            [sys.executable, "-m", "snakemake", "--executor", "vastaidask", "--jobs", "4",
             "--vastaidask-api-url", emu.url, "--vastaidask-api-key", emu.api_key,
             "--vastaidask-gpu", "RTX_3090", "--vastaidask-max-instances", "4",
             "--vastaidask-boot-timeout", str(int(boot_s) + 240)],
            wd, env, 1800,
        )
        left, rentals = emu.instances(), emu.meter()["instances"]
    lines = [json.loads(x) for x in (wd / ".snakemake/vastaidask/transfers.jsonl").read_text().splitlines()]
    regs = registrations.read(probe)
    return {"t0": t0, "t1": t1, "last": last, "first_reg": regs[0] if regs else None, "registered": len(regs),
            "regs_s": [round(t - t0, 1) for t in regs],
            "latency_s": sorted(t["latency_s"] for t in lines), "worker_s": sorted(t["seconds"] for t in lines),
            "timeline": sorted((t["start"]["at"] - t0, t["done_at"] - t0, t["worker_name"][-1]) for t in lines),
            "rentals": len(rentals), "left": len(left),
            "per_worker": dict(Counter(t["worker_name"] for t in lines)),
            "starts": dict(Counter((t.get("start") or {}).get("mode", "?") for t in lines))}


def theirs(root: Path, jobs: int, seconds: float, boot_s: float, rate_limits: bool) -> dict:
    from dask_vastai.emulator import Emulator

    python = vastai_plugin_python()
    name = "vastai" + ("" if rate_limits else "-no-rate-limits")
    wd = workflow(root, name, jobs, seconds)
    with Emulator(runtime="sandbox", boot_delay_s=boot_s, rate_limits=rate_limits, state_dir=root / f"emu-{name}") as emu:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env.update(VAST_URL=emu.url, VAST_API_KEY=emu.api_key)
        t0, t1, last = timed(
            [str(python), "-m", "snakemake", "--executor", "vastai", "--jobs", "4",
             "--vastai-gpu-name", "RTX_3090"],
            wd, env, 3600,
        )
        left, rentals = emu.instances(), emu.meter()["instances"]
    return {"t0": t0, "t1": t1, "last": last, "rentals": len(rentals), "left": len(left)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--boot", type=float, default=60.0)
    parser.add_argument("--timeline", action="store_true", help="print when each job started and ended")
    parser.add_argument("--vastai-plugin", action="store_true",
                        help="also run snakemake-executor-plugin-vastai on a fresh emulator")
    a = parser.parse_args()
    waves = -(-a.jobs // 4)
    ideal, ideal_work = a.boot + waves * a.seconds, waves * a.seconds
    print(f"load average at start {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        r = ours(Path(tmp), a.jobs, a.seconds, a.boot)
        makespan = r["t1"] - r["t0"]
        to_reg = r["first_reg"] - r["t0"]
        tail = r["t1"] - r["last"]
        work = makespan - to_reg - tail
        print(f"vastaidask: {a.jobs} jobs x {a.seconds:g}s, --jobs 4, boot delay {a.boot:g}s: "
              f"makespan {makespan:.1f}s, ideal {ideal:.0f}s, ratio {makespan / ideal:.2f}")
        print(f"  start -> first registration {to_reg:.1f}s, last output -> exit {tail:.1f}s; "
              f"work part {work:.1f}s against {ideal_work:.0f}s: ratio {work / ideal_work:.2f}")
        print(f"  instances rented {r['rentals']}, left after {r['left']}, workers registered {r['registered']}; "
              f"jobs per worker {r['per_worker']}; starts {r['starts']}")
        print(f"  registrations at {r['regs_s']}s; job hand-off -> outputs here, median "
              f"{statistics.median(r['latency_s']):.2f}s (max {r['latency_s'][-1]:.1f}s), "
              f"of which on the worker {statistics.median(r['worker_s']):.2f}s")
        if a.timeline:
            for started, done, worker in r["timeline"]:
                print(f"    worker {worker}: started {started:6.1f}s, outputs here {done:6.1f}s")
        if a.vastai_plugin:
            kinder = ""
            try:
                v = theirs(Path(tmp), a.jobs, a.seconds, a.boot, rate_limits=True)
            except RunFailed as e:
                # Its SDK retries a 429 three times within a second: a --jobs 4 start trips
                # Vast's search interval. Measured again with the limits off, which only favours it.
                print(f"snakemake-executor-plugin-vastai on the same emulator (Vast's rate limits on): {e}")
                kinder = " (emulator's rate limits OFF for it, ours ran with them on)"
                v = theirs(Path(tmp), a.jobs, a.seconds, a.boot, rate_limits=False)
            theirs_s = v["t1"] - v["t0"]
            print(f"snakemake-executor-plugin-vastai 0.1.4, same workflow, boot delay and sandboxes{kinder}: "
                  f"makespan {theirs_s:.1f}s (last output -> exit {v['t1'] - v['last']:.1f}s), "
                  f"instances rented {v['rentals']}, left after {v['left']}")
            print(f"  vastaidask is {theirs_s / makespan:.1f}x faster")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""The account-level commands: ``offers``, ``ls`` and ``cleanup``.

They find dask-vastai's rentals by label (``dask-vastai:<cluster>:<worker>``), so a
crashed laptop's cluster can be found and destroyed from any machine with the key.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from rich.console import Console
from rich.table import Table

from .exceptions import VastError
from .labels import LABEL_PREFIX, cluster_label_prefix, parse_label
from .offers import OfferRequirements
from .vast import Instance, VastAPI


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)


async def run(args: argparse.Namespace) -> int:
    """Run one account-level command; returns the process exit code."""
    console = _console()
    try:
        async with VastAPI(api_key=args.api_key, api_url=args.api_url) as api:
            if args.command == "offers":
                return await _offers(api, args, console)
            if args.command == "ls":
                return await _ls(api, args, console)
            if args.command == "cleanup":
                return await _cleanup(api, args, console)
    except (VastError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    raise AssertionError(f"unknown command {args.command!r}")


async def _offers(api: VastAPI, args: argparse.Namespace, console: Console) -> int:
    kwargs = {"num_gpus": args.num_gpus} if args.num_gpus else {}
    req = OfferRequirements(
        gpu=args.gpu if args.gpu is None or len(args.gpu) > 1 else args.gpu[0],
        max_price=args.max_price,
        region=args.region,
        query=args.query or "",
        **kwargs,
    )
    req.validate()
    offers = await api.search_offers(req.filters(), order=req.order, limit=args.limit, storage_gb=req.disk_gb)
    console.print(f"query: {req.query_text()}")
    table = Table("offer", "GPU", "#", "GPU RAM", "CPUs", "RAM", "$/h", "reliability", "where")
    for o in offers:
        table.add_row(
            str(o.id), o.gpu_name, str(o.num_gpus), f"{o.gpu_ram_mb / 1024:.0f} GB",
            f"{o.cpu_cores_effective:g}", f"{o.cpu_ram_mb / 1024:.0f} GB", f"{o.dph_total:.3f}",
            f"{o.reliability:.3f}", o.geolocation or "",
        )
    console.print(table)
    if not offers:
        console.print("no offer matches; relax the price, region or GPU")
        return 1
    return 0


async def _ours(api: VastAPI, cluster: str | None) -> list[Instance]:
    prefix = cluster_label_prefix(cluster) if cluster else LABEL_PREFIX
    return [i for i in await api.list_instances(label_prefix=prefix) if i.label and i.label.startswith(prefix)]


def _table(instances: list[Instance]) -> Table:
    table = Table("instance", "cluster", "worker", "GPU", "status", "$/h", "up")
    now = time.time()
    for i in instances:
        cluster, worker = parse_label(i.label or "")
        up_min = (now - i.start_date) / 60 if i.start_date else 0.0
        table.add_row(
            str(i.id), cluster, worker, f"{i.num_gpus}x {i.gpu_name}", str(i.actual_status),
            f"{i.dph_total:.3f}", f"{up_min:.0f} min",
        )
    return table


async def _ls(api: VastAPI, args: argparse.Namespace, console: Console) -> int:
    instances = await _ours(api, args.cluster)
    if not instances:
        console.print("no dask-vastai rentals")
        return 0
    console.print(_table(instances))
    rate = sum(i.dph_total for i in instances)
    console.print(f"{len(instances)} rentals, ${rate:.3f}/h together")
    return 0


async def _cleanup(api: VastAPI, args: argparse.Namespace, console: Console) -> int:
    instances = await _ours(api, args.cluster)
    if not instances:
        console.print("nothing to clean up: no dask-vastai rentals")
        return 0
    console.print(_table(instances))
    if not args.yes:
        if not sys.stdin.isatty():
            console.print("not destroying without --yes (standard input is not a terminal)")
            return 1
        prompt = f"destroy these {len(instances)} rentals? [y/N] "
        answer = await asyncio.to_thread(input, prompt)
        if answer.strip().lower() not in {"y", "yes"}:
            console.print("nothing destroyed")
            return 1
    await api.destroy_instances([i.id for i in instances])
    left = await _ours(api, args.cluster)
    if left:
        console.print(f"[red]{len(left)} rentals still listed:[/red] {[i.id for i in left]}")
        return 1
    console.print(f"destroyed {len(instances)} rentals")
    return 0

"""The account-level commands: ``offers``, ``ls`` and ``cleanup``.

They find dask-vastai's rentals by label (``dask-vastai:<cluster>:<worker>``), so a
crashed laptop's cluster can be found and destroyed from any machine with the key.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time

from rich.console import Console
from rich.table import Table

from .display import duration, usd, usd_per_hour
from .exceptions import VastError
from .labels import LABEL_PREFIX, cluster_label_prefix, parse_label
from .offers import OfferPreview, OfferRequirements, preview_offers
from .vast import Instance, VastAPI, looks_torn_down

#: the width tables are laid out in when the output is not a terminal (a pipe has none)
PIPE_WIDTH = 100_000


def _console() -> Console:
    # rich lays tables out in 80 columns when stdout is not a terminal, cutting cells in a
    # pipe or a file; there, as wide as the rows are.
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else PIPE_WIDTH)


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


def offer_requirements(args: argparse.Namespace) -> OfferRequirements:
    """The requirements a cluster with these options would rent with: its shape options over
    the ``vastai:`` config and ``DASK_VASTAI__*`` (``PoolShape`` -> ``Pool``, as the cluster does)."""
    from .pools import Pool, PoolShape

    gpu = args.gpu if args.gpu is None or len(args.gpu) > 1 else args.gpu[0]
    shape = PoolShape(
        gpu=gpu, num_gpus=args.num_gpus, max_price=args.max_price, region=args.region, query=args.query,
        disk=args.disk, reliability=args.reliability, order=args.order,
        datacenter=False if args.no_datacenter else None, interruptible=True if args.interruptible else None,
    )
    return Pool.from_shape("offers", shape, onstart="").requirements


def _offer_json(preview: OfferPreview) -> str:
    offers = [
        {f.name: getattr(o, f.name) for f in dataclasses.fields(o) if f.name != "raw"} for o in preview.offers
    ]
    return json.dumps({"query": preview.query_text, "sent": preview.query, "offers": offers}, indent=2)


async def _offers(api: VastAPI, args: argparse.Namespace, console: Console) -> int:
    preview = await preview_offers(api, offer_requirements(args), limit=args.limit)
    if args.json:
        print(_offer_json(preview))
        return 0 if preview.offers else 1
    console.print(preview)
    if not preview.offers:
        console.print("relax the price, region, reliability or GPU (`dask-vastai gpus` lists the names)")
        return 1
    return 0


async def _ours(api: VastAPI, cluster: str | None, *, torn_down: bool = True) -> list[Instance]:
    """dask-vastai's rentals (of one cluster); ``torn_down=False`` leaves out rows of destroys under way."""
    prefix = cluster_label_prefix(cluster) if cluster else LABEL_PREFIX
    return [i for i in await api.list_instances(label_prefix=prefix)
            if i.label and i.label.startswith(prefix) and (torn_down or not looks_torn_down(i))]


def _uptime_s(instance: Instance, now: float) -> float:
    """Seconds billed so far (Vast bills from the rental's start)."""
    return max(0.0, now - instance.start_date) if instance.start_date else 0.0


def _table(instances: list[Instance]) -> Table:
    """One row per rental (id, cluster, worker, GPU, state, $/h, uptime, $ so far) and the totals."""
    table = Table("instance", "cluster", "worker", "GPU", "status", "$/h", "up", "cost so far")
    now = time.time()
    for i in instances:
        cluster, worker = parse_label(i.label or "")
        up_s = _uptime_s(i, now)
        table.add_row(
            str(i.id), cluster, worker, f"{i.num_gpus}x {i.gpu_name}", str(i.actual_status),
            usd_per_hour(i.dph_total), duration(up_s), usd(i.dph_total * up_s / 3600),
        )
    if len(instances) > 1:
        table.add_section()
        table.add_row(
            "total", "", "", "", "", usd_per_hour(sum(i.dph_total for i in instances)), "",
            usd(sum(i.dph_total * _uptime_s(i, now) / 3600 for i in instances)),
        )
    return table


async def _ls(api: VastAPI, args: argparse.Namespace, console: Console) -> int:
    instances = await _ours(api, args.cluster)
    if not instances:
        console.print("no dask-vastai rentals")
        return 0
    console.print(_table(instances))
    now = time.time()
    total = sum(i.dph_total for i in instances)
    spent = sum(i.dph_total * _uptime_s(i, now) / 3600 for i in instances)
    console.print(f"{len(instances)} rentals, {usd_per_hour(total)} together, {usd(spent)} so far")
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
    report = await api.destroy_instances([i.id for i in instances])
    if report.survivors:
        console.print(f"{len(report.survivors)} rentals were still running after the bulk destroy and were "
                      f"destroyed again: {list(report.survivors)}")
    left = await _ours(api, args.cluster, torn_down=False)
    if left:
        console.print(f"[red]{len(left)} rentals still listed as running:[/red] {[i.id for i in left]}")
        return 1
    lingering = await _ours(api, args.cluster)
    if lingering:
        console.print(f"{len(lingering)} rows are still listed while Vast tears them down "
                      f"({', '.join(sorted({str(i.actual_status) for i in lingering}))}); they no longer bill")
    console.print(f"destroyed {len(instances)} rentals")
    return 0

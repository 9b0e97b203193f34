"""``dask-vastai ls / cleanup / offers`` as a user runs them, against the emulator."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from dask_vastai.labels import rental_label
from dask_vastai.vast import CreateRequest, VastAPI


def _cli(*args: str, emu, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dask_vastai.cli", *args, "--api-url", emu.url, "--api-key", emu.api_key],
        capture_output=True, text=True, timeout=120, input=stdin,
    )


def _rent(emu, labels: list[str]) -> list[int]:
    async def main() -> list[int]:
        async with VastAPI(api_key=emu.api_key, api_url=emu.url) as api:
            offers = await api.search_offers("gpu_name=RTX_3090", limit=len(labels))
            ids = []
            for offer, label in zip(offers, labels, strict=True):
                rental = await api.create_instance(offer.id, CreateRequest(image="img", disk_gb=10, label=label))
                ids.append(rental.instance_id)
            return ids

    return asyncio.run(main())


def test_ls_and_cleanup_find_only_our_rentals(emulator) -> None:
    ours = _rent(emulator, [rental_label("alpha", "alpha-0"), rental_label("beta", "beta-0")])
    theirs = _rent(emulator, ["my-notebook"])
    listed = _cli("ls", emu=emulator)
    assert listed.returncode == 0, listed.stderr
    for i in ours:
        assert str(i) in listed.stdout
    assert str(theirs[0]) not in listed.stdout
    assert "alpha" in listed.stdout and "beta" in listed.stdout

    refused = _cli("cleanup", "--cluster", "alpha", emu=emulator, stdin="")
    assert refused.returncode == 1 and "--yes" in refused.stdout
    assert len(emulator.instances()) == 3

    done = _cli("cleanup", "--cluster", "alpha", "--yes", emu=emulator)
    assert done.returncode == 0, done.stdout + done.stderr
    left = {row["id"] for row in emulator.instances()}
    assert left == {ours[1], theirs[0]}

    done = _cli("cleanup", "--yes", emu=emulator)
    assert {row["id"] for row in emulator.instances()} == {theirs[0]}


def test_bad_key_is_a_sentence_not_a_traceback(emulator) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dask_vastai.cli", "ls", "--api-url", emulator.url, "--api-key", "wrong-key-9876"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "wrong-key-9876" not in proc.stderr + proc.stdout
    assert "key" in proc.stdout.lower()


def test_offers_prints_query_and_prices(emulator) -> None:
    proc = _cli("offers", "--gpu", "RTX_4090", "--max-price", "5", emu=emulator)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gpu_name=RTX_4090" in proc.stdout and "4090" in proc.stdout.split("gpu_name", 1)[1]

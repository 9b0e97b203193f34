"""The process-wide ledger of live rentals (``safety.py``) and the emergency destroy that empties it.

The broker writes each rental into the ledger the moment Vast accepts it and strikes it out
when it is destroyed; at interpreter exit or on SIGTERM/SIGHUP the ledger bulk-destroys what
is left, per account, with fresh clients. These tests use their own :class:`RentalLedger`,
never the process's ``LEDGER``, and keep its exit and signal hooks out of the test process.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from dask_vastai import safety
from dask_vastai.safety import RentalLedger
from dask_vastai.vast import CreateRequest, VastAPI

REQUEST = CreateRequest(image="vastai/pytorch", disk_gb=20, label="ledger-test", onstart="echo hi")


class QuietLedger(RentalLedger):
    """A ledger that counts its calls to install the exit and signal hooks instead of installing them."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_installs = 0

    def install_handlers(self) -> None:
        self.hook_installs += 1


@pytest.fixture
def ledger() -> QuietLedger:
    return QuietLedger()


def test_live_rentals_are_grouped_by_account(ledger: QuietLedger) -> None:
    alice = VastAPI(api_key="key-alice", api_url="https://console.vast.ai")
    bob = VastAPI(api_key="key-bob", api_url="https://console.vast.ai")
    alice_elsewhere = VastAPI(api_key="key-alice", api_url="http://127.0.0.1:9999/")
    ledger.add(alice, 1)
    ledger.add(alice, 2)
    ledger.add(bob, 3)
    ledger.add(alice_elsewhere, 4)
    ledger.add(alice, 2)  # twice is once
    assert ledger.live() == {
        ("https://console.vast.ai", "key-alice"): {1, 2},
        ("https://console.vast.ai", "key-bob"): {3},
        ("http://127.0.0.1:9999", "key-alice"): {4},
    }
    assert ledger.hook_installs == 5  # every add makes sure the hooks are in place


def test_discard_strikes_out_and_forgets_empty_accounts(ledger: QuietLedger) -> None:
    alice = VastAPI(api_key="key-alice", api_url="https://console.vast.ai")
    bob = VastAPI(api_key="key-bob", api_url="https://console.vast.ai")
    ledger.add(alice, 1)
    ledger.add(alice, 2)
    ledger.discard(alice, 1)
    ledger.discard(alice, 99)  # never added: nothing to do
    ledger.discard(bob, 1)  # an account never seen: nothing to do
    assert ledger.live() == {("https://console.vast.ai", "key-alice"): {2}}
    ledger.discard(alice, 2)
    assert ledger.live() == {}


def test_live_is_a_copy(ledger: QuietLedger) -> None:
    alice = VastAPI(api_key="key-alice", api_url="https://console.vast.ai")
    ledger.add(alice, 1)
    ledger.live()[("https://console.vast.ai", "key-alice")].add(2)
    assert ledger.live() == {("https://console.vast.ai", "key-alice"): {1}}


def test_handlers_are_installed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    registered: list[tuple[object, tuple[object, ...]]] = []
    chained: list[signal.Signals] = []
    monkeypatch.setattr(safety.atexit, "register", lambda func, *args: registered.append((func, args)))
    monkeypatch.setattr(safety, "_chain_signal", lambda sig, handler: chained.append(sig))
    book = RentalLedger()
    book.install_handlers()
    book.install_handlers()
    assert registered == [(book.destroy_everything, ("interpreter exit",))]
    assert chained == [signal.SIGTERM, signal.SIGHUP]


def _rent(emu, n: int) -> list[int]:
    async def main() -> list[int]:
        async with VastAPI(api_key=emu.api_key, api_url=emu.url, pace=False) as api:
            offers = await api.search_offers("gpu_name=RTX_3090 num_gpus=1", order="dph_total", limit=n)
            return [(await api.create_instance(offer.id, REQUEST)).instance_id for offer in offers]

    return asyncio.run(main())


def _destroy_calls(emu) -> list[dict]:
    return [r for r in emu.requests if r["method"] == "DELETE"]


def test_destroy_everything_bulk_destroys_what_is_live_and_only_that(emulator, ledger, capsys) -> None:
    first, second, kept = _rent(emulator, 3)
    api = VastAPI(api_key=emulator.api_key, api_url=emulator.url)
    for instance_id in (first, second, kept):
        ledger.add(api, instance_id)
    ledger.discard(api, kept)  # the cluster destroyed it itself (here: it stays, the ledger no longer holds it)

    ledger.destroy_everything("test exit")

    assert [row["id"] for row in emulator.instances()] == [kept]
    assert ledger.live() == {}
    assert len(_destroy_calls(emulator)) == 1  # one bulk call for the account
    assert "dask-vastai: test exit: destroying 2 rental(s) still billing" in capsys.readouterr().err
    # nothing left: a second call (signal, then exit) does nothing
    ledger.destroy_everything("interpreter exit")
    assert len(_destroy_calls(emulator)) == 1
    assert capsys.readouterr().err == ""


def test_a_destroy_that_fails_keeps_the_rentals_and_says_what_to_run(emulator, ledger, capsys) -> None:
    (instance_id,) = _rent(emulator, 1)
    wrong = VastAPI(api_key="not-the-key", api_url=emulator.url)
    ledger.add(wrong, instance_id)

    ledger.destroy_everything("test exit")

    assert [row["id"] for row in emulator.instances()] == [instance_id]
    assert ledger.live() == {(emulator.url, "not-the-key"): {instance_id}}
    err = capsys.readouterr().err
    assert f"could not destroy rentals [{instance_id}]" in err and "run `dask-vastai cleanup`" in err

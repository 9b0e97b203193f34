"""The client side runs on macOS as well as Linux.

Only what runs on the instances (the probe, the supervisor) and the emulator may use
Linux-only calls. A fresh interpreter here plays a Mac: the ``os``, ``select``, ``socket``
and ``signal`` attributes macOS lacks are removed, and a read of ``/proc`` or ``/sys`` by
client code fails the test. It imports every client module, then does what a user's first
minutes do against a local (records-only) emulator: the key check, an offer search,
``dask-vastai offers`` and ``ls``, the cross-process pacing file, and the onstart text.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from dask_vastai.emulator import Emulator

REPO = Path(__file__).resolve().parents[2]

MAC = textwrap.dedent(
    r"""
    import builtins, os, select, signal, sys

    # What Linux has and macOS does not (select first: selectors, which socket imports, picks from it).
    def remove(module, names):
        for name in names:
            if hasattr(module, name):
                delattr(module, name)

    assert "selectors" not in sys.modules and "socket" not in sys.modules
    remove(select, ["epoll", "EPOLLIN", "EPOLLOUT", "EPOLLERR", "EPOLLHUP", "EPOLLET"])
    remove(os, ["sched_getaffinity", "sched_setaffinity", "pidfd_open", "memfd_create", "eventfd", "splice",
                "unshare", "setns", "getxattr", "setxattr", "listxattr", "removexattr", "copy_file_range",
                "posix_fadvise", "sched_getscheduler", "sched_param", "O_PATH", "O_DIRECT", "O_TMPFILE"])
    remove(signal, ["SIGRTMIN", "SIGRTMAX", "pidfd_send_signal", "SIGPWR", "SIGSTKFLT"])
    import socket
    remove(socket, ["SO_BINDTODEVICE", "SOCK_NONBLOCK", "SOCK_CLOEXEC", "TCP_USER_TIMEOUT", "AF_NETLINK"])
    for name in ("prctl", "pyroute2"):
        sys.modules[name] = None  # import fails, as there

    real_open, real_os_open = builtins.open, os.open

    def client_frame():
        frame = sys._getframe(2)
        path = frame.f_code.co_filename
        return "dask_vastai" in path and "emulator" not in path

    def no_procfs(path):
        text = os.fspath(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
        text = text.decode() if isinstance(text, bytes) else text
        if text.startswith(("/proc/", "/sys/")) and client_frame():
            raise AssertionError(f"client code read {text}: there is no such thing on macOS")

    def guarded_open(path, *args, **kwargs):
        no_procfs(path)
        return real_open(path, *args, **kwargs)

    def guarded_os_open(path, *args, **kwargs):
        no_procfs(path)
        return real_os_open(path, *args, **kwargs)

    builtins.open, os.open = guarded_open, guarded_os_open

    import asyncio
    import dask_vastai
    from dask_vastai import cli, cluster, commands, instance, rentals, safety, tunnel, vast, bootstrap, pools
    from dask_vastai import adaptive, environment, offers, labels, credentials, config, supervisor
    import snakemake_executor_plugin_vastaidask  # noqa: F401
    from snakemake_executor_plugin_vastaidask import backend, executor, settings, staging, remote  # noqa: F401

    url, key = sys.argv[1], sys.argv[2]

    async def first_minutes():
        async with vast.VastAPI(api_key=key, api_url=url) as api:
            assert api._pacer.shared is not None, "the pacing file works with fcntl and platformdirs"
            await api.current_user()
            req = offers.OfferRequirements(gpu="RTX_3090")
            assert await api.search_offers(req.filters(), limit=3)

    asyncio.run(first_minutes())
    assert cli.main(["offers", "--gpu", "RTX_3090", "--api-url", url, "--api-key", key]) == 0
    assert cli.main(["ls", "--api-url", url, "--api-key", key]) == 0
    key_pair = tunnel.ClusterKey.generate("mac")
    text = bootstrap.onstart_script(bootstrap.BootstrapConfig("mac", key_pair.public_openssh, url, 600))
    assert len(text) < bootstrap.ONSTART_MAX_CHARS
    print("CLIENT OK ON A MAC")
    """
)


def test_the_client_imports_and_talks_to_vast_without_linux_only_calls(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "HOME": str(tmp_path / "home")}
    with Emulator(runtime="record", rate_limits=True, boot_delay_s=0) as emu:
        proc = subprocess.run([sys.executable, "-c", MAC, emu.url, emu.api_key], capture_output=True, text=True,
                              timeout=180, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "CLIENT OK ON A MAC" in proc.stdout

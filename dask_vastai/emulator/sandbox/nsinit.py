"""The init of one emulated instance: builds its namespaces, root and relays, then runs it.

This file is executed as a script (``python -I -S nsinit.py``) by
:class:`~dask_vastai.emulator.sandbox.SandboxRuntime`, never imported by the emulator:
it forks and unshares, which must not happen inside the emulator's event loop, and it
pivots into a root where our package is not visible. It uses the standard library only,
and ``blackhole.py`` beside it (loaded at start, before the pivot).

Process tree (host pids on the left)::

    L  launcher, host root, child subreaper: writes the outer uid/gid maps, waits
    '- P1  pid 1 of the sandbox: new user/mount/net/pid/uts/ipc namespaces
           builds a tmpfs root with read-only binds of the system, pivots into it,
           enters a nested user+mount namespace (the kernel then locks every mount
           flag: ``mount -o remount,rw /usr`` fails), and runs an event loop that
           reaps orphans, hands each SSH connection to ``sshd -i``, relays mapped
           ports, the API and the other instances' mapped ports (``publicnet.py``),
           and runs the onstart script / args workload.

When run by root the outer namespace maps 65536 uids onto an unprivileged host range, so
the sandbox's root owns nothing of the host's and OpenSSH can switch users. Unprivileged,
only uid 0 is mapped (onto the caller) and OpenSSH cannot run (setgroups is denied).

Inputs: the configuration as JSON on stdin, naming the inherited fds: the launcher's status
channel (JSON lines: ``pid``, or ``error`` before the sandbox exists), pid 1's report channel
(``ready`` or ``error``), the container log (onstart/args output), the sshd log (pipes the
host reads, capping what it keeps), and the listening sockets made on the host's loopback. The
launcher exits with the workload's exit code (args runtype) or when the sandbox is killed.

What runs inside is hostile: the status channel never enters the sandbox (pid 1 closes it
first thing, so whatever runs there cannot name a pid for the host to kill), pid 1 closes
its report channel once ready, and every fd pid 1 holds is close-on-exec, so the workload
and sshd start with their stdio and nothing of the host's.

Pid 1 is also the sandbox's network boundary, and meters it (:class:`Meter`): every byte in
or out crosses one of its relays (mapped ports, other instances' ports, the API) or an SSH
connection it handed to ``sshd -i``, whose kernel counters (``TCP_INFO``: bytes acked and
received, SSH and TLS overhead included) it reads while ``sshd`` runs and once more when it
exits. Relayed bytes move socket -> pipe -> socket in the kernel (``splice``), one thread
per direction, so the relays add no copy through Python. The totals go to the host as JSON
lines on the meter pipe, a few times a second and at once on SIGUSR1 (the host asks before
it stops the sandbox).
"""

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import importlib.util
import json
import os
import shlex
import signal
import socket
import struct
import sys
import threading
import traceback
import types

STATUS_FD, LOG_FD, SSHD_LOG_FD = -1, -1, -1  # set from the configuration in main()

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_CHILD_SUBREAPER, PR_SET_DUMPABLE, PR_SET_PDEATHSIG = 36, 4, 1
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _sibling(name: str) -> types.ModuleType:
    """A module beside this script (``-I`` keeps our directory off sys.path)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                     name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


blackhole = _sibling("blackhole")


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode(), target.encode(), fstype.encode() if fstype else None,
            ctypes.c_ulong(flags), data.encode() if data else None,
        ),
        f"mount {source} on {target} ({fstype}, flags {flags:#x}, {data})",
    )


def umount(target: str) -> None:
    _check(_libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")


def pivot_root(new: str, old: str) -> None:
    number = SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise OSError(errno.ENOSYS, f"pivot_root: unknown syscall number on {os.uname().machine}")
    _check(_libc.syscall(number, new.encode(), old.encode()), "pivot_root")


def prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl({option})")


def status(message: dict) -> None:
    """One line on the status channel; the launcher's parent reads it."""
    try:
        os.write(STATUS_FD, (json.dumps(message) + "\n").encode())
    except OSError:
        pass


def write_file(path: str, text: str | bytes, mode: int = 0o644) -> None:
    data = text.encode() if isinstance(text, str) else text
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, mode)


def write_id_maps(pid: int | str, uid_line: str, gid_line: str, deny_setgroups: bool) -> None:
    if deny_setgroups:
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write(uid_line)
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write(gid_line)


# --------------------------------------------------------------------------- launcher


def launcher(cfg: dict) -> int:
    """Runs on the host: fork the sandbox, map its ids, wait for it, return its exit code."""
    global STATUS_FD
    # die with the emulator, even SIGKILLed: then pid 1 reads EOF on its lifeline and ends
    parent = os.getppid()
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        return 137
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    # the lifeline: pid 1 ends the sandbox when it reads EOF, i.e. when we are gone
    lifeline_r, lifeline_w = os.pipe()
    cfg["lifeline_fd"] = lifeline_r
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(to_child_w)
        os.close(to_parent_r)
        try:
            unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC)
            open_sources(cfg)
            os.write(to_parent_w, b"u")
            if os.read(to_child_r, 1) != b"m":
                os._exit(70)
            os.setresgid(0, 0, 0)
            if cfg["uid_base"] is not None:
                os.setgroups([])
            os.setresuid(0, 0, 0)
            pid1 = os.fork()
            if pid1 == 0:
                os.close(lifeline_w)
                os.close(to_parent_w)  # else the launcher never sees EOF after our pid
                os.close(to_child_r)
                # the launcher's channel (the pid the host signals) never enters the sandbox
                os.close(STATUS_FD)
                STATUS_FD = cfg["report_fd"]
                os._exit(sandbox_init(cfg))
            os.write(to_parent_w, str(pid1).encode())
            os._exit(0)
        except BaseException as exc:  # noqa: BLE001 - reported to the emulator, then exit
            status({"error": f"could not create the sandbox's namespaces: {exc}"})
            os._exit(71)
    os.close(to_child_r)
    os.close(to_parent_w)
    os.close(lifeline_r)
    if os.read(to_parent_r, 1) != b"u":
        os.waitpid(child, 0)
        return 71
    count = cfg["uid_count"]
    if cfg["uid_base"] is None:  # unprivileged (or asked to behave so): one uid, root inside
        uid, gid = cfg.get("single_uid") or (os.getuid(), os.getgid())
        write_id_maps(child, f"0 {uid} 1", f"0 {gid} 1", deny_setgroups=True)
    else:
        base = cfg["uid_base"]
        write_id_maps(child, f"0 {base} {count}", f"0 {base} {count}", deny_setgroups=False)
    os.write(to_child_w, b"m")
    pid1_text = b""
    os.close(cfg["report_fd"])  # pid 1's alone from here
    if cfg.get("meter_fd") is not None:
        os.close(cfg["meter_fd"])  # pid 1's too: the host reads what it counted there
    while chunk := os.read(to_parent_r, 32):
        pid1_text += chunk
    os.waitpid(child, 0)
    if not pid1_text:
        return 72
    pid1 = int(pid1_text)
    status({"pid": pid1})
    code = 0
    while True:  # we are a subreaper: P1 is ours once its parent exited
        try:
            pid, wstatus = os.waitpid(-1, 0)
        except ChildProcessError:
            return code
        if pid == pid1:
            code = os.waitstatus_to_exitcode(wstatus)
            return code if code >= 0 else 128 - code


# --------------------------------------------------------------------------- P1: build


def open_sources(cfg: dict) -> None:
    """Open what the root binds, in the new mount namespace, before our uid changes.

    Our file-system uid is still the caller's here, so a prefix under a private home
    (``/root/.pyenv``) can be reached; afterwards the sandbox's root owns nothing of the
    host. Binding from ``/proc/self/fd/N`` needs the fd to live in this mount namespace.
    """
    sources = {}
    sockets = filter(None, [cfg.get("api_sock"), cfg.get("public_sock")])
    for path in [*cfg["system_paths"], *cfg["python_prefixes"], *sockets]:
        if os.path.lexists(path) and not os.path.islink(path):
            sources[path] = os.open(path, os.O_PATH | os.O_CLOEXEC)
    cfg["sources"] = sources


def source(cfg: dict, path: str) -> str:
    return f"/proc/self/fd/{cfg['sources'][path]}"


def _bind_flags(source: str) -> int:
    """The flags a read-only remount must keep: the kernel refuses to drop locked ones."""
    st = os.statvfs(source)
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
    for st_flag, ms_flag in ((8, MS_NOEXEC), (1024, MS_NOATIME), (2048, MS_NODIRATIME), (4096, MS_RELATIME)):
        if st.f_flag & st_flag:
            flags |= ms_flag
    return flags


def bind(source: str, target: str, readonly: bool = True) -> None:
    mount(source, target, None, MS_BIND | MS_REC)
    if readonly:
        mount(source, target, None, _bind_flags(source))


def makedirs(path: str, mode: int = 0o755) -> None:
    os.makedirs(path, exist_ok=True)
    os.chmod(path, mode)


def build_root(cfg: dict) -> str:
    root = "/mnt" if os.path.isdir("/mnt") else "/tmp"  # any directory: this is our mount ns
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    mount("vastemu", root, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['tmpfs_size']},mode=0755")
    for entry in cfg["system_paths"]:
        target = root + entry
        if os.path.islink(entry):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(entry), target)
        elif entry in cfg["sources"]:
            os.makedirs(target, exist_ok=True)
            bind(source(cfg, entry), target)
    for prefix in cfg["python_prefixes"]:  # the "image": interpreter and site-packages, read-only
        target = root + prefix
        if prefix not in cfg["sources"] or (os.path.isdir(target) and os.listdir(target)):
            continue
        os.makedirs(target, exist_ok=True)
        bind(source(cfg, prefix), target)
    for path, mode in (("/root", 0o700), ("/tmp", 0o1777), ("/workspace", 0o755), ("/home", 0o755),
                       ("/var/tmp", 0o1777), ("/var/log", 0o755), ("/run/sshd", 0o755),
                       ("/run/vast-emu/bin", 0o755), ("/mnt", 0o755), ("/root/.ssh", 0o700)):
        makedirs(root + path, mode)
    if not os.path.lexists(root + "/var/run"):
        os.symlink("/run", root + "/var/run")
    build_dev(cfg, root + "/dev")
    makedirs(root + "/proc", 0o555)
    try:
        mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError as exc:
        raise OSError(exc.errno, (
            f"{exc.strerror}. The kernel refuses a fresh /proc where the host's is partly masked, "
            "as Docker does by default: run the emulator's container with "
            "--security-opt systempaths=unconfined (or on a VM), or use --runtime record")) from exc
    makedirs(root + "/sys", 0o555)
    try:
        mount("sysfs", root + "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        pass  # nothing we run needs /sys; the fake nvidia-smi reads our own file
    if cfg.get("cpu_view"):
        fake_cpu_view(cfg["cpu_view"], root)
    for key, name in (("api_sock", "api.sock"), ("public_sock", "public.sock")):
        if cfg.get(key):
            write_file(root + "/run/vast-emu/" + name, "", 0o600)
            bind(source(cfg, cfg[key]), root + "/run/vast-emu/" + name, readonly=False)
    write_files(cfg, root)
    # the host's shadow file is unreadable here, which OpenSSH takes for a locked root
    # account; an image's shadow has no passwords either, only unlocked accounts
    users = [line.split(":", 1)[0] for line in open("/etc/passwd") if ":" in line]
    write_file(root + "/run/vast-emu/shadow", "".join(f"{u}:*:20000:0:99999:7:::\n" for u in users), 0o640)
    bind(root + "/run/vast-emu/shadow", root + "/etc/shadow")
    # as Docker does: the container's own name resolves (tools look their hostname up)
    write_file(root + "/run/vast-emu/hosts", f"127.0.0.1\tlocalhost {cfg['hostname']}\n::1\tlocalhost ip6-localhost\n")
    bind(root + "/run/vast-emu/hosts", root + "/etc/hosts")
    return root


def fake_cpu_view(view: dict, root: str) -> None:
    """Show ``view["cores"]`` CPUs and ``view["ram_mb"]`` of memory: files bound over the kernel's.

    /proc/cpuinfo repeats the machine's first processor; /proc/meminfo says the total (and
    most of it free); /sys/devices/system/cpu/{online,possible,present} is what glibc's
    ``sysconf(_SC_NPROCESSORS_ONLN)`` reads, so ``os.cpu_count()`` and psutil follow.
    """
    cores, ram_kb = int(view["cores"]), int(view["ram_mb"]) * 1024
    run = root + "/run/vast-emu"
    with open("/proc/cpuinfo") as f:  # still the host's /proc here
        first = f.read().split("\n\n")[0]
    blocks = []
    for i in range(cores):
        lines = []
        for line in first.splitlines():
            key = line.split(":")[0].strip()
            value = {"processor": i, "core id": i, "apicid": i, "initial apicid": i, "physical id": 0,
                     "siblings": cores, "cpu cores": cores}.get(key)
            lines.append(line if value is None else f"{line.split(':')[0]}: {value}")
        blocks.append("\n".join(lines))
    write_file(run + "/cpuinfo", "\n\n".join(blocks) + "\n\n")
    fields = [("MemTotal", ram_kb), ("MemFree", ram_kb * 9 // 10), ("MemAvailable", ram_kb * 19 // 20),
              ("Buffers", 0), ("Cached", ram_kb // 20), ("SwapCached", 0), ("Active", ram_kb // 20),
              ("Inactive", 0), ("SwapTotal", 0), ("SwapFree", 0), ("Shmem", 0), ("Slab", 0),
              ("SReclaimable", 0), ("SUnreclaim", 0)]
    write_file(run + "/meminfo", "".join(f"{k + ':':<16}{v:>8} kB\n" for k, v in fields))
    write_file(run + "/cpu_online", f"0-{cores - 1}\n" if cores > 1 else "0\n")
    for name in ("cpuinfo", "meminfo"):
        bind(run + "/" + name, root + "/proc/" + name)
    for name in ("online", "possible", "present"):
        if os.path.exists(root + "/sys/devices/system/cpu/" + name):
            bind(run + "/cpu_online", root + "/sys/devices/system/cpu/" + name)


def narrow_affinity(cores: int) -> None:
    """Run on at most ``cores`` of the machine's CPUs (children inherit it)."""
    cpus = sorted(os.sched_getaffinity(0))
    if cores < len(cpus):
        os.sched_setaffinity(0, cpus[:cores])


def build_dev(cfg: dict, dev: str) -> None:
    makedirs(dev)
    mount("vastemu-dev", dev, "tmpfs", MS_NOSUID, "size=64k,mode=0755")
    for name in ("null", "zero", "full", "random", "urandom", "tty", *cfg["gpu_devices"]):
        source = "/dev/" + name
        if os.path.exists(source):
            write_file(dev + "/" + name, "", 0o666)
            bind(source, dev + "/" + name, readonly=False)
    makedirs(dev + "/pts")
    mount("devpts", dev + "/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
    os.symlink("pts/ptmx", dev + "/ptmx")
    makedirs(dev + "/shm", 0o1777)
    mount("shm", dev + "/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=256m,mode=1777")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, dev + "/" + name)


def write_files(cfg: dict, root: str) -> None:
    run = root + "/run/vast-emu"
    write_file(root + "/root/.ssh/authorized_keys", cfg["authorized_keys"], 0o600)
    if cfg["ssh_environment"] is not None:  # sessions see the container's env (variant ssh_env)
        env_lines = "".join(f"{k}={v}\n" for k, v in cfg["ssh_environment"].items() if "\n" not in v)
        write_file(root + "/root/.ssh/environment", env_lines, 0o600)
    write_host_keys(cfg, root)
    for name, text in cfg["sshd_configs"].items():
        write_file(run + "/" + sshd_config_name(name), text, 0o644)
    write_file(run + "/gpus.json", json.dumps(cfg["fake_gpus"]), 0o644)
    for name, text in cfg["bin_files"].items():
        write_file(run + "/bin/" + name, text, 0o755)


def write_host_keys(cfg: dict, root: str) -> None:
    """The image's /etc/ssh: the host's client files (never its keys), our sshd_config and keys.

    /etc is the host's, read-only; a tmpfs over /etc/ssh holds the rental's own keys, as an
    image's sshd keeps them there. The impostor's key (a fault) lives outside it. A host
    without /etc/ssh has no OpenSSH either: asyncssh's server then serves the keys itself.
    """
    etc_ssh = root + "/etc/ssh"
    if os.path.isdir(etc_ssh):
        host_files = []
        for name in sorted(os.listdir(etc_ssh)):
            path = etc_ssh + "/" + name
            if not name.startswith("ssh_host_") and name != "sshd_config" and os.path.isfile(path):
                try:
                    with open(path, "rb") as f:
                        host_files.append((name, f.read()))
                except OSError:
                    pass  # not readable by the sandbox's root: not the image's either
        mount("vastemu-etc-ssh", etc_ssh, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=0755")
        for name, data in host_files:
            write_file(etc_ssh + "/" + name, data, 0o644)
        write_file(etc_ssh + "/sshd_config", cfg["image_sshd_config"], 0o644)
        for name, text in cfg["host_keys"].items():
            write_file(etc_ssh + "/" + name, text, 0o644 if name.endswith(".pub") else 0o600)
    if cfg.get("impostor_key"):
        write_file(root + "/run/vast-emu/impostor_host_key", cfg["impostor_key"], 0o600)


def sshd_config_name(name: str) -> str:
    """The file of the sshd configuration for one kind of listener ("direct" or "proxy")."""
    return "sshd_config" if name == "direct" else f"sshd_config_{name}"


def network_up() -> None:
    """Bring up the sandbox's own loopback and let its root bind low ports."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), 0x8913, ifreq))[1]
        fcntl.ioctl(s.fileno(), 0x8914, struct.pack("16sH14x", b"lo", flags | 1))
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start", "w") as f:
            f.write("0")
    except OSError:
        pass  # then only ports >= 1024 can be served by onstart programs


def enter_root(root: str) -> None:
    os.chdir(root)
    pivot_root(".", ".")
    umount(".")
    os.chdir("/")


def nest_user_namespace(count: int) -> None:
    """Enter a user+mount namespace below ours: every mount made so far becomes locked."""
    # changing uids made us non-dumpable, which gives /proc/1/* to the host's root
    prctl(PR_SET_DUMPABLE, 1)
    ready_r, ready_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        os.close(ready_w)
        os.read(ready_r, 1)
        try:
            write_id_maps(1, f"0 0 {count}", f"0 0 {count}", deny_setgroups=False)
            os._exit(0)
        except OSError as exc:
            os.write(2, f"nsinit: nested id map: {exc}\n".encode())
            os._exit(1)
    os.close(ready_r)
    unshare(CLONE_NEWUSER | CLONE_NEWNS)
    os.write(ready_w, b"g")
    os.close(ready_w)
    _, wstatus = os.waitpid(helper, 0)
    if os.waitstatus_to_exitcode(wstatus) != 0:
        raise OSError("could not map ids in the nested user namespace")
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def sandbox_init(cfg: dict) -> int:
    """P1: build the sandbox, then serve it until the workload (args) or a kill ends it."""
    try:
        close_on_exec_all()
        socket.sethostname(cfg["hostname"])
        network_up()
        root = build_root(cfg)
        enter_root(root)
        for fd in cfg["sources"].values():
            os.close(fd)
        nest_user_namespace(cfg["uid_count"])
        if cfg.get("cpu_view"):
            narrow_affinity(int(cfg["cpu_view"]["cores"]))
        if cfg["openssh"]:
            check_sshd(cfg)
    except BaseException as exc:  # noqa: BLE001 - reported to the emulator
        status({"error": f"{exc}", "trace": traceback.format_exc()})
        return 1
    return asyncio.run(Init(cfg).run())


def check_sshd(cfg: dict) -> None:
    """Fail the boot with sshd's own words if it refuses its configuration."""
    for name in dict.fromkeys(spec["sshd"] for spec in cfg["listen"] if spec["kind"] == "ssh"):
        path = "/run/vast-emu/" + sshd_config_name(name)
        pid = os.posix_spawn(cfg["sshd"], [cfg["sshd"], "-t", "-f", path], cfg["env"],
                             file_actions=[(os.POSIX_SPAWN_DUP2, SSHD_LOG_FD, 2)])
        _, wstatus = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(wstatus) != 0:
            raise RuntimeError(f"sshd -t rejected the sandbox's {path} (see the sshd log)")


# --------------------------------------------------------------------------- P1: meter


#: ``struct tcp_info``: ``tcpi_bytes_acked`` and ``tcpi_bytes_received`` (u64) sit at byte 120
_TCP_INFO_LEN, _TCP_BYTES_AT = 136, 120
#: bytes one splice call moves at most (and the size asked of each relay pipe)
_SPLICE_CHUNK = 1 << 20
_F_SETPIPE_SZ = 1031


def tcp_bytes(sock: socket.socket) -> "tuple[int, int] | None":
    """(bytes sent and acked, bytes received) of a TCP socket, from the kernel; None when closed."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    if len(raw) < _TCP_INFO_LEN:
        return None
    return struct.unpack_from("QQ", raw, _TCP_BYTES_AT)


class Meter:
    """Bytes across this sandbox's boundary: ``up`` left it, ``down`` entered it.

    Relays add what they move; the SSH connections handed to ``sshd -i`` are kept here (pid 1
    holds them until their sshd is reaped) and read through ``TCP_INFO``.
    """

    def __init__(self, fd: "int | None") -> None:
        self.fd = fd
        self.up = 0
        self.down = 0
        self.lock = threading.Lock()
        self.ssh: dict[int, tuple[socket.socket, int, int]] = {}  # pid -> (socket, acked, received)
        self.reported = (-1, -1)

    def add(self, up: int = 0, down: int = 0) -> None:
        with self.lock:
            self.up += up
            self.down += down

    def keep_ssh(self, pid: int, sock: socket.socket) -> None:
        self.ssh[pid] = (sock, 0, 0)

    def read_ssh(self, pid: "int | None" = None) -> None:
        """Add what the SSH connections moved since the last read; ``pid``: its sshd exited."""
        for key in [pid] if pid is not None else list(self.ssh):
            if key not in self.ssh:
                continue
            sock, acked, received = self.ssh[key]
            now = tcp_bytes(sock)
            if now is not None:
                self.add(up=max(0, now[0] - acked), down=max(0, now[1] - received))
                self.ssh[key] = (sock, max(acked, now[0]), max(received, now[1]))
            if pid is not None or now is None:
                self.ssh.pop(key, None)
                if pid is not None:
                    sock.close()

    def report(self, force: bool = False) -> None:
        """One JSON line with the totals, when they changed (``force``: in any case)."""
        self.read_ssh()
        with self.lock:
            totals = (self.up, self.down)
        if self.fd is None or (totals == self.reported and not force):
            return
        try:
            os.write(self.fd, (json.dumps({"up": totals[0], "down": totals[1]}) + "\n").encode())
            self.reported = totals
        except OSError:
            pass


def _pump(src: socket.socket, dst: socket.socket, count) -> None:
    """Move ``src``'s bytes to ``dst`` until EOF (then half-close ``dst``), telling ``count(n)``."""
    try:
        read_fd, write_fd = os.pipe()
    except OSError:
        read_fd = write_fd = -1
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_fd, _F_SETPIPE_SZ, _SPLICE_CHUNK)
        spliced = read_fd >= 0
        while True:
            if spliced:
                try:
                    n = os.splice(src.fileno(), write_fd, _SPLICE_CHUNK)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    spliced = False  # a socket kind splice does not take: copy through here
                    continue
                if n == 0:
                    break
                count(n)
                left = n
                while left:
                    left -= os.splice(read_fd, dst.fileno(), left)
            else:
                data = src.recv(_SPLICE_CHUNK)
                if not data:
                    break
                count(len(data))
                dst.sendall(data)
    except OSError:
        pass
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def relay(inside: socket.socket, outside: socket.socket, meter: Meter) -> None:
    """Join a connection inside the sandbox to one outside it, both ways, metered; close both at the end."""
    for sock in (inside, outside):
        sock.setblocking(True)

    def run() -> None:
        down = threading.Thread(target=_pump, args=(outside, inside, lambda n: meter.add(down=n)), daemon=True)
        down.start()
        _pump(inside, outside, lambda n: meter.add(up=n))
        down.join()
        inside.close()
        outside.close()

    threading.Thread(target=run, daemon=True).start()


# --------------------------------------------------------------------------- P1: serve


_DEFAULT_SIGNALS = {signal.SIGPIPE, signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP,
                    signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGXFSZ}


def close_on_exec_all() -> None:
    """Mark every fd of ours above stdio close-on-exec: what we spawn gets its stdio only.

    Pid 1 holds the host's pipes and sockets (the report channel, the logs, the lifeline,
    the listening sockets); the workload and each ``sshd -i`` get exactly the fds that
    ``spawn`` puts on their 0, 1 and 2.
    """
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # the listing's own fd, gone already


def spawn(argv: list[str], env: dict[str, str], stdin: int, stdout: int, stderr: int) -> int:
    actions = [(os.POSIX_SPAWN_DUP2, stdin, 0), (os.POSIX_SPAWN_DUP2, stdout, 1),
               (os.POSIX_SPAWN_DUP2, stderr, 2)]
    return os.posix_spawnp(argv[0], argv, env, file_actions=actions, setsid=True,
                           setsigdef=_DEFAULT_SIGNALS, setsigmask=set())


class Init:
    """pid 1's event loop: reaping, relays, sshd hand-off and the workload."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.env: dict[str, str] = cfg["env"]
        self.session_env: dict[str, str] = cfg["session_env"]
        self.workload_pid: int | None = None
        self.done: asyncio.Future[int] | None = None
        self.servers: list = []
        self.waiters: dict[int, asyncio.Future[int]] = {}
        self.meter = Meter(cfg.get("meter_fd"))
        self._fallback_ids = iter(range(-1, -(1 << 62), -1))
        self.fallback = None
        if not cfg["openssh"] and cfg.get("fallback_source"):
            # asyncssh's server instead of OpenSSH; its module text came in the config
            # because our package is not visible in here, asyncssh is (site-packages)
            sys.path.extend(p for p in cfg["site_paths"] if p not in sys.path)
            module = types.ModuleType("vastemu_fallback_ssh")
            exec(compile(cfg["fallback_source"], "fallback_ssh.py", "exec"), module.__dict__)
            self.fallback = module

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, lambda: self.finish(143))
        loop.add_reader(self.cfg["lifeline_fd"], lambda: self.finish(137))
        loop.add_signal_handler(signal.SIGUSR1, lambda: self.meter.report(force=True))  # the host stops us next
        self.servers.append(asyncio.create_task(self.report_traffic()))
        self.devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        for spec in self.cfg["listen"]:
            sock = socket.socket(fileno=spec["fd"])
            sock.setblocking(False)
            handler = self.ssh_server(spec["sshd"]) if spec["kind"] == "ssh" else self.relay_to_port(spec["port"])
            self.servers.append(asyncio.create_task(self.accept_loop(sock, handler)))
        if self.cfg.get("api_port"):
            sock = _listening("127.0.0.1", self.cfg["api_port"])
            self.servers.append(asyncio.create_task(self.accept_loop(sock, self.relay_api)))
        if self.cfg.get("public_sock"):
            synced = asyncio.Event()
            self.servers.append(asyncio.create_task(self.watch_public_ports(synced)))
            await asyncio.wait_for(synced.wait(), 10)
        self.start_workload()
        status({"ready": True})
        os.close(STATUS_FD)  # nothing more to report: nothing started later may write there
        return await self.done

    def finish(self, code: int) -> None:
        self.meter.report()
        if self.done is not None and not self.done.done():
            self.done.set_result(code)

    async def report_traffic(self, interval_s: float = 0.25) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.meter.report()

    def reap(self) -> None:
        while True:
            try:
                pid, wstatus = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            waiter = self.waiters.pop(pid, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(os.waitstatus_to_exitcode(wstatus))
            self.meter.read_ssh(pid)  # an sshd -i that ended: its connection's last bytes
            if pid == self.workload_pid:
                code = os.waitstatus_to_exitcode(wstatus)
                self.workload_pid = None
                if self.cfg["mode"] == "args":
                    self.finish(code if code >= 0 else 128 - code)

    def start_workload(self) -> None:
        cfg = self.cfg
        if cfg["mode"] == "args":
            argv = (shlex.split(cfg["onstart"]) if cfg.get("onstart") else []) + list(cfg.get("args") or [])
            if not argv:
                self.finish(0)
                return
        elif cfg.get("onstart"):
            argv = ["/bin/bash", "-c", cfg["onstart"]]
        else:
            return
        try:
            self.workload_pid = spawn(argv, self.env, self.devnull, LOG_FD, LOG_FD)
        except OSError as exc:
            os.write(LOG_FD, f"could not start {argv[0]!r}: {exc}\n".encode())
            if cfg["mode"] == "args":
                self.finish(127)

    async def accept_loop(self, sock: socket.socket, handler) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            try:
                await handler(conn)
            except Exception as exc:  # noqa: BLE001 - one bad connection must not stop the sandbox
                os.write(SSHD_LOG_FD, f"nsinit: connection failed: {exc}\n".encode())
                conn.close()

    def ssh_server(self, name: str):
        """The handler of one SSH listener ("direct" or "proxy": they may differ in -R)."""
        async def serve_ssh(conn: socket.socket) -> None:
            """Hand the connection to a fresh ``sshd -i``: no byte of SSH traffic passes through us."""
            if not self.cfg["openssh"]:
                if self.fallback is None:
                    conn.close()
                    return
                remote_forward = name != "proxy" or self.cfg["proxy_remote_forward"]
                # metered until asyncssh closes it (its fileno then reads -1)
                self.meter.keep_ssh(next(self._fallback_ids), conn)
                asyncio.create_task(self.fallback.serve_connection(
                    conn, self.cfg["served_host_keys"], self.spawn_session, self.wait_for, remote_forward))
                return
            conn.setblocking(True)
            try:
                pid = spawn([self.cfg["sshd"], "-i", "-e", "-f", "/run/vast-emu/" + sshd_config_name(name)], self.env,
                            conn.fileno(), conn.fileno(), SSHD_LOG_FD)
            except BaseException:
                conn.close()
                raise
            # kept (and metered) until this sshd is reaped: then its last counts are read and it closes
            self.meter.keep_ssh(pid, conn)
        return serve_ssh

    def spawn_session(self, argv: list[str], stdin: int, stdout: int, stderr: int) -> int:
        pid = spawn(argv, self.session_env, stdin, stdout, stderr)
        self.waiters[pid] = asyncio.get_running_loop().create_future()
        return pid

    def wait_for(self, pid: int) -> "asyncio.Future[int]":
        return self.waiters[pid]

    async def watch_public_ports(self, synced: asyncio.Event) -> None:
        """Listen on 127.0.0.1:P for each port P mapped on the "public IP" (see publicnet.py)."""
        listeners: dict[int, asyncio.AbstractServer] = {}
        # our own host ports are left free: with identity mapping our programs listen there
        own = set(self.cfg["own_host_ports"])
        reader, writer = await asyncio.open_unix_connection("/run/vast-emu/public.sock")
        writer.write(b"WATCH\n")
        while line := await reader.readline():
            sign, value = line[:1], line[1:].strip()
            if sign == b"=":
                synced.set()
            elif sign == b"+" and int(value) not in listeners and int(value) not in own:
                port = int(value)
                try:  # a port our own programs already use keeps them: they were here first
                    sock = _listening("127.0.0.1", port)
                except OSError:
                    continue
                listeners[port] = _Closing([sock], asyncio.create_task(self.accept_loop(sock, self.relay_public(port))))
            elif sign == b"~" and int(value) not in listeners and int(value) not in own:
                try:  # another instance's port that hangs: ours hangs the same way
                    sock, fillers = await asyncio.to_thread(blackhole.hole, "127.0.0.1", int(value), "hang")
                    listeners[int(value)] = _Closing([sock, *fillers])
                except OSError:
                    pass
            elif sign == b"-" and int(value) in listeners:
                listeners.pop(int(value)).close()

    def relay_public(self, port: int):
        """Another instance's mapped port: the host connects it and hands us the socket (no copy
        through the emulator), which we join to the connection made here."""
        async def handler(conn: socket.socket) -> None:
            def run() -> None:
                try:
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as host:
                        host.settimeout(30)
                        host.connect("/run/vast-emu/public.sock")
                        host.sendall(f"CONNECT {port}\n".encode())
                        _, fds, _, _ = socket.recv_fds(host, 16, 1)
                except OSError:
                    fds = []
                if not fds:
                    conn.close()  # refused: not a mapped port, or its host is gone
                    return
                relay(conn, socket.socket(fileno=fds[0]), self.meter)
            threading.Thread(target=run, daemon=True).start()
        return handler

    def relay_to_port(self, port: int):
        """One of our mapped ports: the host's connection, joined to our own 127.0.0.1:<port>."""
        async def handler(conn: socket.socket) -> None:
            self.relay_in_thread(conn, socket.AF_INET, ("127.0.0.1", port), outside_is=conn)
        return handler

    async def relay_api(self, conn: socket.socket) -> None:
        """The API at the same address as outside: 127.0.0.1:<port> here -> the host's API."""
        self.relay_in_thread(conn, socket.AF_UNIX, "/run/vast-emu/api.sock", outside_is=None)

    def relay_in_thread(self, conn: socket.socket, family: int, address, outside_is) -> None:
        """Connect ``address`` in a thread, then relay it with ``conn``; ``outside_is=conn``: ``conn``
        came from outside (a mapped port), else the new connection leads outside."""
        def run() -> None:
            other = socket.socket(family, socket.SOCK_STREAM)
            try:
                other.connect(address)
            except OSError:
                other.close()
                conn.close()
                return
            if outside_is is conn:
                relay(other, conn, self.meter)
            else:
                relay(conn, other, self.meter)
        threading.Thread(target=run, daemon=True).start()


class _Closing:
    """Sockets closed together, in place of a server (a hanging port's listener and fillers)."""

    def __init__(self, sockets: list, task: "asyncio.Task | None" = None) -> None:
        self.sockets = sockets
        self.task = task

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        for sock in self.sockets:
            sock.close()


def _listening(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def main() -> int:
    global STATUS_FD, LOG_FD, SSHD_LOG_FD
    cfg = json.loads(sys.stdin.read())
    STATUS_FD, LOG_FD, SSHD_LOG_FD = cfg["status_fd"], cfg["log_fd"], cfg["sshd_log_fd"]
    return launcher(cfg)


if __name__ == "__main__":
    sys.exit(main())

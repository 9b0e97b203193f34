"""The warm runner: one process per Dask worker that has imported Snakemake and forks each job.

Starting ``python -m snakemake ... --mode remote`` for a job costs about 2.5 s, nearly all of
it importing snakemake and every installed plugin (its argument parser registers them all);
forking a process that has already done so costs milliseconds. A worker starts this program
on its first job and keeps it for its own life (``remote.py``); it is never shared between
workers.

The worker runs it as ``python -c <this source> <fd> <worker pid>``: ``fd`` is one end of a
socketpair the worker made and passed down, the only way in. There is no port and no path,
so nothing but the worker that started it can hand it work. Standard library only at import:
the worker cannot be assumed to import this plugin, so the source travels as text.

Protocol, newline-delimited JSON:

- control socket (the inherited one). Runner -> worker, once: ``{"ready": ...}`` after the
  imports, or ``{"error": "..."}``. Worker -> runner: one byte per job carrying two
  descriptors (SCM_RIGHTS): the job's own socket and its log file, opened by the worker.
- job socket. Worker -> runner: ``{"argv": [...], "env": {...}, "cwd": "..."}``, later
  ``{"signal": n}`` to signal the job's process group. Runner -> worker: ``{"pid": n}`` once
  forked, ``{"rc": n}`` once it exited (negative: killed by that signal).

A job is forked into a session of its own (process group = its pid, as the plain start's
``start_new_session``), with the log as stdout and stderr and ``/dev/null`` as stdin; it runs
``snakemake.cli.main(argv)`` (what ``python -m snakemake`` runs) and exits with its code.

Nothing outlives its worker: the runner kills every job's process group and exits when the
control socket closes (the worker process died or closed it) or its parent changes; a job
kills its own group when its parent (this runner) changes; a job whose socket closes before
it exits (its worker gave up on it) is killed; the group of a finished job is killed too,
so a job's stray children die with it.
"""

import atexit
import json
import os
import selectors
import signal
import socket
import sys
import threading
import time
import traceback

#: seconds between two checks that the parent (worker, or runner for a job) is still there
PARENT_POLL_S = 1.0
#: a job request larger than this (argv + environment) is refused
MAX_REQUEST_BYTES = 8 << 20


def prime() -> None:
    """Import what every job imports: snakemake's CLI with every installed plugin (building
    the argument parser registers executor, storage, logger, report and scheduler plugins)
    and its storage layer (requests, smart_open)."""
    import snakemake.cli

    snakemake.cli.get_argument_parser()
    import snakemake.storage  # noqa: F401


def _send(sock: socket.socket, message: dict) -> bool:
    try:
        sock.sendall(json.dumps(message).encode() + b"\n")
        return True
    except OSError:  # the worker side is gone; its job is killed when its socket is read
        return False


def _exit_code(code: object) -> int:
    """What the interpreter would exit with for ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _die_with_parent(parent: int) -> None:
    """A job's watchdog thread: once its runner is gone, kill the job's whole process group."""
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent:
            os.killpg(0, signal.SIGKILL)


class _Job:
    """One job's socket, log descriptor (until forked), read buffer and process."""

    def __init__(self, sock: socket.socket, log_fd: int) -> None:
        self.sock = sock
        self.log_fd: int | None = log_fd
        self.buffer = b""
        self.pid: int | None = None
        self.done = False


class Runner:
    """The select loop: job sockets in, forks out, exits reaped and reported."""

    def __init__(self, control: socket.socket, worker_pid: int) -> None:
        self.control = control
        self.worker_pid = worker_pid
        self.selector = selectors.DefaultSelector()
        self.jobs: dict[int, _Job] = {}  # by socket fd
        self.running: dict[int, _Job] = {}  # by pid
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the loop (wakeup fd)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        self.selector.register(self.control, selectors.EVENT_READ, "control")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")

    # ----------------------------------------------------------------- loop
    def serve(self) -> None:
        try:
            while True:
                for key, _ in self.selector.select(timeout=PARENT_POLL_S):
                    if key.data == "control":
                        if not self._accept():
                            return
                    elif key.data == "wake":
                        self._drain_wake()
                    else:
                        self._read(key.data)
                self._reap()
                if os.getppid() != self.worker_pid:
                    return
        finally:
            self._kill_all()

    def _accept(self) -> bool:
        """A job from the worker: its socket and log descriptor. False once the worker is gone."""
        flags = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
        try:
            data, fds, _, _ = socket.recv_fds(self.control, 1, 2, flags)
        except OSError:
            return False
        if not data:
            return False
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            return True
        job = _Job(socket.socket(fileno=fds[0]), fds[1])
        self.jobs[job.sock.fileno()] = job
        self.selector.register(job.sock, selectors.EVENT_READ, job)
        return True

    def _read(self, job: _Job) -> None:
        try:
            data = job.sock.recv(1 << 16)
        except OSError:
            data = b""
        if not data:  # the worker gave up on this job (or died): nothing of it may stay
            if job.pid is not None and not job.done:
                self._signal(job, signal.SIGKILL)
            self._forget(job)
            return
        job.buffer += data
        if len(job.buffer) > MAX_REQUEST_BYTES:
            _send(job.sock, {"error": f"request over {MAX_REQUEST_BYTES} bytes"})
            self._forget(job)
            return
        while b"\n" in job.buffer:
            line, job.buffer = job.buffer.split(b"\n", 1)
            try:
                message = json.loads(line)
            except ValueError:
                message = {}
            if "argv" in message and job.pid is None:
                self._fork(job, message)
            elif "signal" in message and job.pid is not None and not job.done:
                self._signal(job, int(message["signal"]))

    def _signal(self, job: _Job, signum: int) -> None:
        """Signal a job's process group while its leader is unreaped (its pid cannot be reused)."""
        try:
            os.killpg(job.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def _drain_wake(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        while self.running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            job = self.running.pop(pid, None)
            if job is None:
                continue
            job.done = True
            # The group outlives its leader while any of its processes does: a job's strays die with it.
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            _send(job.sock, {"rc": os.waitstatus_to_exitcode(status)})
            self._forget(job)

    def _forget(self, job: _Job) -> None:
        if job.log_fd is not None:
            os.close(job.log_fd)
            job.log_fd = None
        if self.jobs.pop(job.sock.fileno(), None) is not None:
            self.selector.unregister(job.sock)
        job.sock.close()

    def _kill_all(self) -> None:
        for pid in list(self.running):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in list(self.running):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self.running.clear()

    # ----------------------------------------------------------------- fork
    def _fork(self, job: _Job, request: dict) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 127
            try:
                code = self._child(job, request)
            except BaseException:  # noqa: BLE001 - a child must never return into the loop
                traceback.print_exc()
            finally:
                os._exit(code)
        job.pid = pid
        self.running[pid] = job
        os.close(job.log_fd)
        job.log_fd = None
        _send(job.sock, {"pid": pid})

    def _child(self, job: _Job, request: dict) -> int:
        """In the forked child: become the job (``python -m snakemake`` with its argv, env, cwd)."""
        os.setsid()
        runner = os.getppid()
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log_fd = job.log_fd
        # The runner's descriptors are not the job's: the worker's socket above all.
        self.selector.close()
        self.control.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        for other in self.jobs.values():
            other.sock.close()
            if other.log_fd is not None and other is not job:
                os.close(other.log_fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        import tempfile

        tempfile.tempdir = None  # TMPDIR is the job's
        workflow = sys.modules.get("snakemake.workflow")
        if workflow is not None and hasattr(workflow.Workflow, "_rundir"):
            workflow.Workflow._rundir = os.getcwd()  # taken at import: the job's, as in a fresh interpreter
        from snakemake.cli import main

        # As ``python -m snakemake`` would have them: the banner prints sys.argv, imports
        # from the workflow's directory find it first.
        sys.argv = [os.path.join(os.path.dirname(sys.modules["snakemake"].__file__), "__main__.py"),
                    *request["argv"]]
        sys.path.insert(0, os.getcwd())
        threading.Thread(target=_die_with_parent, args=(runner,), daemon=True).start()
        try:
            main(request["argv"])
            code = 0
        except SystemExit as e:
            code = _exit_code(e.code)
        except BaseException:  # noqa: BLE001 - the job's own failure, reported as python would
            traceback.print_exc()
            code = 1
        finally:
            atexit._run_exitfuncs()  # logging.shutdown and the like, as at a normal exit
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
        return code


def main(argv: list[str]) -> int:
    control = socket.socket(fileno=int(argv[0]))
    worker_pid = int(argv[1])
    # Ctrl-C in the worker's terminal is the worker's to handle; this runner follows it out.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # ``python -c`` puts the current directory first; the imports here must not come from it.
    sys.path[:] = [p for p in sys.path if p not in ("", ".")]
    t0 = time.monotonic()
    try:
        prime()
    except BaseException as e:  # noqa: BLE001 - told to the worker, which starts jobs plainly
        _send(control, {"error": f"{type(e).__name__}: {e}"})
        return 1
    if not _send(control, {"ready": True, "pid": os.getpid(), "import_s": round(time.monotonic() - t0, 3)}):
        return 1
    Runner(control, worker_pid).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

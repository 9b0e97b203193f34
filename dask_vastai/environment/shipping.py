"""What must travel: the code no index can install, and the client's dask config.

Workers need every module that a task's function comes from. What an index installed the
image has, or the user's ``packages`` install; what no index can install is shipped: the
user's local and editable packages and modules (``mylib.py`` next to the script, a
development checkout of dask-vastai itself) and its non-default dask config, as one archive
over SFTP, unpacked into a folder that the incarnation puts first on the worker's
``PYTHONPATH`` (the config: on its ``DASK_CONFIG``). Our own config section never travels.

In the emulator the sandbox sees the client's own interpreter and site-packages but not the
development checkout, so the checkout is shipped there, as it would be to a Vast image.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import logging
import os
import shlex
import sys
import sysconfig
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

# The step keeps the one logger it had as a module, so that what filters on its name still works.
logger = logging.getLogger("dask_vastai.environment")

#: Where the shipped archive is unpacked on the instance (one folder per archive digest).
SHIP_DIR = "/root/.dask-vastai/ship"
#: Files bigger than this are left out of a shipped package (with a warning): data files in
#: a source tree should not ride along with every boot.
MAX_SHIPPED_FILE_BYTES = 20 * 2**20
#: A shipment this big is worth a warning: it is uploaded to every instance at every boot.
LARGE_SHIPMENT_BYTES = 64 * 2**20
#: Config sections never shipped: ours holds the Vast API key, which never leaves this machine.
PRIVATE_CONFIG_SECTIONS = ("vastai",)
_SKIPPED_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".mypy_cache", ".pytest_cache", ".ruff_cache"}


def _installed_roots() -> list[str]:
    """Folders whose modules an index installed (or the interpreter carries): never shipped."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths = sysconfig.get_paths()
    roots.update(paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths)
    try:
        import site

        roots.update(site.getsitepackages())
        roots.add(site.getusersitepackages())
    except (AttributeError, ImportError):  # pragma: no cover - virtualenv's old site.py
        pass
    return sorted({os.path.realpath(r) for r in roots if r})


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


@dataclass(frozen=True)
class LocalModule:
    """A top-level module or package the client imported and no index can install."""

    name: str
    #: the module's file, or the package's folder
    path: str
    #: why it is shipped: "next to the script" (its folder is on sys.path: the script's, the
    #: notebook's cwd), "editable install" (an installed distribution's code outside
    #: site-packages) or "missing on the instance" (installed here, not importable there)
    why: str


def local_modules(
    modules: Mapping[str, Any] | None = None,
    path: Sequence[str] | None = None,
    *,
    include: Iterable[str] = (),
) -> list[LocalModule]:
    """The imported top-level modules that workers need but cannot install from an index.

    A module qualifies when its code lives outside the interpreter's and site-packages'
    folders and it is importable by its name: its folder is on ``sys.path`` (the script's
    folder, the notebook's cwd) or an installed distribution provides it (an editable
    install, a development checkout). Names in ``include`` are shipped wherever they live
    (dask-vastai itself when the instance lacks this exact version).
    """
    modules = sys.modules if modules is None else modules
    search = [os.path.realpath(p or os.getcwd()) for p in (sys.path if path is None else path)]
    installed = _installed_roots()
    provided = _provided_modules()
    wanted = set(include)
    found = []
    for name, module in sorted(modules.items()):
        if "." in name or name == "__main__" or module is None:
            continue
        file = getattr(module, "__file__", None)
        if not file:
            continue  # builtins, namespace packages
        file = os.path.realpath(file)
        is_package = hasattr(module, "__path__") and os.path.basename(file).startswith("__init__.")
        source = os.path.dirname(file) if is_package else file
        if not is_package and not file.endswith(".py"):
            continue  # a compiled extension outside site-packages cannot run on another machine
        if os.path.basename(source).split(".")[0] != name:
            continue  # imported under another name (pytest's importlib mode): not importable by it
        root = os.path.dirname(source)
        if _under(root, installed):
            if name in wanted:
                found.append(LocalModule(name, source, "missing on the instance"))
        elif root in search:
            found.append(LocalModule(name, source, "next to the script"))
        elif name in provided:
            found.append(LocalModule(name, source, "editable install"))
    return found


@lru_cache(maxsize=1)
def _provided_modules() -> frozenset[str]:
    """Top-level names that installed distributions provide (scanning them takes ~0.3 s: once)."""
    try:
        return frozenset(metadata.packages_distributions())
    except Exception:  # noqa: BLE001 - a broken dist-info must not stop the cluster
        return frozenset()


def non_default_config(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The client's dask config that differs from the packages' defaults (our section left out).

    The user's YAML files, ``DASK_*`` variables and ``dask.config.set`` calls made before the
    cluster starts all show up here, and so reach the workers.
    """
    import dask.config

    defaults: dict[str, Any] = {}
    for d in dask.config.defaults:
        dask.config.update(defaults, copy.deepcopy(d))
    current = dask.config.config if config is None else config

    def diff(now: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in now.items():
            old = base.get(key, _MISSING) if isinstance(base, Mapping) else _MISSING
            if isinstance(value, Mapping) and isinstance(old, Mapping):
                sub = diff(value, old)
                if sub:
                    out[key] = sub
            elif value != old:
                out[key] = copy.deepcopy(value)
        return out

    out = diff(current, defaults)
    for section in PRIVATE_CONFIG_SECTIONS:
        out.pop(section, None)
    return out


_MISSING = object()


@dataclass(frozen=True)
class Shipment:
    """One gzip'd tar of the shipped modules (``site/``) and dask config (``dask-config/``)."""

    archive: bytes
    digest: str
    modules: tuple[LocalModule, ...]
    config_keys: tuple[str, ...]
    skipped: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.modules and not self.config_keys

    @property
    def folder(self) -> str:
        """Where it is unpacked on the instance."""
        return f"{SHIP_DIR}/{self.digest[:16]}"

    def env(self) -> dict[str, str]:
        """What the incarnation adds to the worker's environment."""
        out = {}
        if self.modules:
            out["PYTHONPATH"] = f"{self.folder}/site"
        if self.config_keys:
            out["DASK_CONFIG"] = f"{self.folder}/dask-config"
        return out

    def describe(self) -> str:
        names = ", ".join(f"{m.name} ({m.why})" for m in self.modules) or "no modules"
        conf = f"dask config {', '.join(self.config_keys)}" if self.config_keys else "no dask config"
        return f"{names}; {conf}; {len(self.archive) / 1024:.0f} KiB"


def _config_yaml(config: Mapping[str, Any]) -> tuple[bytes, tuple[str, ...]]:
    import yaml

    keep: dict[str, Any] = {}
    for key, value in config.items():
        try:
            yaml.safe_dump({key: value})
        except yaml.YAMLError:
            logger.warning("dask config %r holds a value YAML cannot write; it is not shipped", key)
            continue
        keep[key] = value
    if not keep:
        return b"", ()
    return yaml.safe_dump(keep, sort_keys=True).encode(), tuple(sorted(keep))


def build_shipment(modules: Sequence[LocalModule], config: Mapping[str, Any]) -> Shipment:
    """The archive for ``modules`` and ``config``; the same inputs give the same digest."""
    buf = io.BytesIO()
    skipped: list[str] = []
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=6) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:

            def add(arcname: str, data: bytes, mtime: float = 0) -> None:
                info = tarfile.TarInfo(arcname)
                info.size, info.mode, info.mtime = len(data), 0o644, int(mtime)
                tar.addfile(info, io.BytesIO(data))

            for mod in modules:
                source = Path(mod.path)
                if source.is_file():
                    add(f"site/{source.name}", source.read_bytes(), source.stat().st_mtime)
                    continue
                for dirpath, dirnames, filenames in os.walk(source):
                    dirnames[:] = sorted(
                        d for d in dirnames if d not in _SKIPPED_DIRS and not d.startswith(".") and not d.endswith(".egg-info")
                    )
                    for fname in sorted(filenames):
                        f = Path(dirpath, fname)
                        # hidden files (.env, credentials) stay here: send nothing a task does not need
                        if fname.endswith((".pyc", ".pyo")) or fname.startswith(".") or not f.is_file():
                            continue
                        size = f.stat().st_size
                        rel = f.relative_to(source.parent).as_posix()
                        if size > MAX_SHIPPED_FILE_BYTES:
                            skipped.append(f"{rel} ({size / 2**20:.0f} MiB)")
                            continue
                        add(f"site/{rel}", f.read_bytes(), f.stat().st_mtime)
            text, keys = _config_yaml(config)
            if text:
                add("dask-config/client.yaml", text)
    if skipped:
        logger.warning("not shipped to the instances (over %d MiB each): %s", MAX_SHIPPED_FILE_BYTES >> 20,
                       ", ".join(skipped))
    data = buf.getvalue()
    if len(data) > LARGE_SHIPMENT_BYTES:
        logger.warning(
            "shipping %.0f MiB of local code to every instance (%s): move data files out of these packages "
            "or install them from an index with packages=[...]",
            len(data) / 2**20, ", ".join(m.name for m in modules),
        )
    return Shipment(data, hashlib.sha256(data).hexdigest(), tuple(modules), keys, tuple(skipped))


#: Unpacks the archive (argv: archive, folder) once per digest; a second boot finds it there.
_UNPACK_PY = (
    "import os,shutil,sys,tarfile\n"
    "a,d=sys.argv[1:3]\n"
    "if not os.path.isdir(d):\n"
    "    t=d+'.tmp%d'%os.getpid()\n"
    "    with tarfile.open(a) as f:\n"
    "        f.extractall(t,**({'filter':'data'} if hasattr(tarfile,'data_filter') else {}))\n"
    "    try: os.rename(t,d)\n"
    "    except OSError: shutil.rmtree(t,ignore_errors=True)\n"
    "os.remove(a)\n"
    "print(d)\n"
)


def unpack_command(python: str, archive_path: str, folder: str) -> str:
    """Shell that unpacks the uploaded archive into ``folder`` with the workers' interpreter."""
    return " ".join(shlex.quote(x) for x in (python, "-c", _UNPACK_PY, archive_path, folder))

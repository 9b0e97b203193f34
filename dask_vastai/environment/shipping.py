"""What must travel: the code no index can install, and the dask config workers obey.

Workers need every module that a task's function comes from. What an index installed the
image has, or the user's ``packages`` install; what no index can install is shipped: the
user's local and editable packages and modules (``mylib.py`` next to the script, a
development checkout of dask-vastai itself) and the part of its dask config that changes how
a worker behaves, as one archive over SFTP, unpacked into a folder that the incarnation puts
first on the worker's ``PYTHONPATH`` (the config: on its ``DASK_CONFIG``).

Every host is a stranger, so only what a task needs goes: a package travels as its Python
files plus the data files its project declares (``[tool.setuptools.package-data]``,
``setup.cfg``'s ``package_data``, ``MANIFEST.in``, or the files an installed distribution
recorded), and a warning names every other file left behind (a ``credentials.json`` beside
the code stays here). The config travels from an allow-list of sections
(``vastai.ship-config``), without any key whose name looks like a credential.

In the emulator the sandbox sees the client's own interpreter and site-packages but not the
development checkout, so the checkout is shipped there, as it would be to a Vast image.
"""

from __future__ import annotations

import configparser
import copy
import gzip
import hashlib
import io
import logging
import os
import re
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
#: Config sections never shipped, whatever the allow-list says: ours holds the Vast API key,
#: which never leaves this machine.
PRIVATE_CONFIG_SECTIONS = ("vastai",)
#: Words that make a config key (any segment of its path, split at ``-``, ``_`` and ``.``)
#: look like a credential: such a key is never shipped, even inside an allowed section.
SECRET_WORDS = frozenset({
    "token", "tokens", "password", "passwd", "passphrase", "secret", "secrets", "credential",
    "credentials", "key", "apikey", "auth", "authorization", "cookie", "private", "bearer",
})
#: A value holding a URL with a password in it (``https://user:pass@host``) is not shipped.
_URL_CREDENTIALS = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
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
def _distributions() -> Mapping[str, list[str]]:
    """Top-level name -> the installed distributions providing it (scanning takes ~0.3 s: once)."""
    try:
        return metadata.packages_distributions()
    except Exception:  # noqa: BLE001 - a broken dist-info must not stop the cluster
        return {}


def _provided_modules() -> frozenset[str]:
    """Top-level names that installed distributions provide."""
    return frozenset(_distributions())


def looks_secret(name: str) -> bool:
    """Whether a config key or variable name looks like it holds a credential (``HF_TOKEN``)."""
    return any(word in SECRET_WORDS for word in re.split(r"[-_.\s]+", str(name).lower()))


def shipped_config(
    config: Mapping[str, Any] | None = None, allowed: Iterable[str] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """``(what workers get, the dotted keys left out)`` of the client's non-default dask config.

    ``allowed``: dotted prefixes (``distributed.worker``) that change how a worker behaves;
    default ``vastai.ship-config``. Within them, keys that look like credentials
    (:func:`looks_secret`) and values holding a URL with a password are left out too.
    """
    from ..config import option

    prefixes = [tuple(str(a).split(".")) for a in (option("ship-config") if allowed is None else allowed)]
    left_out: list[str] = []

    def keep(node: Mapping[str, Any], path: tuple[str, ...], inside: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            here = (*path, str(key))
            dotted = ".".join(here)
            allowed_here = inside or any(here[: len(p)] == p for p in prefixes)
            leads_to_allowed = any(p[: len(here)] == here for p in prefixes)
            if looks_secret(str(key)) or (allowed_here and _holds_url_credentials(value)):
                left_out.append(f"{dotted} (looks like a credential)")
            elif isinstance(value, Mapping) and (allowed_here or leads_to_allowed):
                sub = keep(value, here, allowed_here)
                if sub or (allowed_here and not value):
                    out[key] = sub
            elif allowed_here:
                out[key] = value
            else:
                left_out.append(dotted)
        return out

    kept = keep(non_default_config(config), (), False)
    return kept, left_out


def _holds_url_credentials(value: Any) -> bool:
    if isinstance(value, list | tuple):
        return any(_holds_url_credentials(v) for v in value)
    return isinstance(value, str) and bool(_URL_CREDENTIALS.search(value))


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


def declared_package_data(package: Path) -> set[Path]:
    """The files of ``package`` (a folder) that its distribution or project declares as data.

    An installed distribution's record lists exactly what was installed; for a source tree
    (next to the script, an editable install) the project beside it says, in the places
    setuptools reads: ``[tool.setuptools.package-data]`` in ``pyproject.toml``,
    ``[options.package_data]`` in ``setup.cfg``, and ``MANIFEST.in``.
    """
    recorded = _recorded_files(package)
    if recorded:
        return recorded
    for root in (package.parent, package.parent.parent):
        found = [root / n for n in ("pyproject.toml", "setup.cfg", "MANIFEST.in") if (root / n).is_file()]
        if found:
            return {f for f in _project_data(root, package) if f.is_file()}
    return set()


def _recorded_files(package: Path) -> set[Path]:
    """Files an installed (not editable) distribution recorded under ``package``."""
    out: set[Path] = set()
    for dist_name in _distributions().get(package.name, []):
        try:
            files = metadata.distribution(dist_name).files or []
        except metadata.PackageNotFoundError:
            continue
        for f in files:
            path = Path(str(f.locate())).resolve()
            if path.is_relative_to(package):
                out.add(path)
    return out


def _project_data(root: Path, package: Path) -> list[Path]:
    """What the project at ``root`` declares as data of ``package`` and its subpackages."""
    found: list[Path] = []
    patterns: dict[str, list[str]] = {}
    try:
        import tomllib

        with open(root / "pyproject.toml", "rb") as f:
            table = tomllib.load(f).get("tool", {}).get("setuptools", {}).get("package-data", {})
        patterns.update({str(k): [str(p) for p in v] for k, v in table.items()})
    except (OSError, ValueError):
        pass
    cfg = configparser.ConfigParser()
    try:
        cfg.read(root / "setup.cfg")
        for k, v in (cfg["options.package_data"].items() if cfg.has_section("options.package_data") else []):
            patterns.setdefault(k, []).extend(p.strip() for p in re.split(r"[,\n]", v) if p.strip())
    except configparser.Error:
        pass
    for key, globs in patterns.items():
        if key in ("", "*"):
            folders = [d for d in [package, *package.rglob("*")] if (d / "__init__.py").is_file()]
        elif key == package.name or key.startswith(package.name + "."):
            folders = [package.joinpath(*key.split(".")[1:])]
        else:
            continue
        for folder in folders:
            for pattern in globs:
                found.extend(folder.glob(pattern))
    found.extend(_manifest_files(root, package))
    return found


def _manifest_files(root: Path, package: Path) -> list[Path]:
    """The files under ``package`` that ``MANIFEST.in`` adds (and does not take away again)."""
    try:
        lines = (root / "MANIFEST.in").read_text().splitlines()
    except OSError:
        return []
    files: set[Path] = set()
    for line in lines:
        words = line.split("#", 1)[0].split()
        matched = _manifest_match(root, words[0], words[1:]) if len(words) >= 2 else None
        if matched is None:
            continue
        if words[0] in ("include", "recursive-include", "graft"):
            files |= matched
        else:
            files -= matched
    return sorted(p for p in files if p.resolve().is_relative_to(package))


def _manifest_match(root: Path, command: str, args: list[str]) -> set[Path] | None:
    """The paths one ``MANIFEST.in`` command names; None for a command we do not read."""
    if command in ("include", "exclude"):
        return {p for a in args for p in root.glob(a)}
    if command in ("recursive-include", "recursive-exclude") and len(args) >= 2:
        return {p for pattern in args[1:] for p in (root / args[0]).rglob(pattern)}
    if command in ("graft", "prune"):
        return {p for a in args for p in (root / a).rglob("*")}
    if command == "global-exclude":
        return {p for a in args for p in root.rglob(a)}
    return None


@dataclass(frozen=True)
class Shipment:
    """One gzip'd tar of the shipped modules (``site/``) and dask config (``dask-config/``)."""

    archive: bytes
    digest: str
    modules: tuple[LocalModule, ...]
    config_keys: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    #: files of the shipped packages that are neither Python nor declared data (left here)
    left_behind: tuple[str, ...] = ()
    #: dask config keys not shipped (outside the allow-list, or looking like credentials)
    config_left_out: tuple[str, ...] = ()

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
        if self.config_left_out:
            conf += f" (not shipped: {', '.join(self.config_left_out)})"
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


def build_shipment(
    modules: Sequence[LocalModule], config: Mapping[str, Any], config_left_out: Sequence[str] = ()
) -> Shipment:
    """The archive for ``modules`` and ``config``; the same inputs give the same digest.

    A package travels as its ``.py`` files plus its declared data (:func:`declared_package_data`);
    a warning names what else is in its folder and stays here.
    """
    buf = io.BytesIO()
    skipped: list[str] = []
    left_behind: list[str] = []
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
                declared = declared_package_data(source.resolve())
                for dirpath, dirnames, filenames in os.walk(source):
                    dirnames[:] = sorted(
                        d for d in dirnames if d not in _SKIPPED_DIRS and not d.startswith(".") and not d.endswith(".egg-info")
                    )
                    for fname in sorted(filenames):
                        f = Path(dirpath, fname)
                        # hidden files (.env) and byte code are never code a task needs
                        if fname.endswith((".pyc", ".pyo")) or fname.startswith(".") or not f.is_file():
                            continue
                        rel = f.relative_to(source.parent).as_posix()
                        if not fname.endswith(".py") and f.resolve() not in declared:
                            left_behind.append(rel)
                            continue
                        size = f.stat().st_size
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
    if left_behind:
        shown = ", ".join(left_behind[:20]) + (f" and {len(left_behind) - 20} more" if len(left_behind) > 20 else "")
        logger.warning(
            "not shipped to the instances (neither Python files nor declared package data): %s. A file a task "
            "needs must be declared as package data ([tool.setuptools.package-data] in pyproject.toml, "
            "package_data in setup.cfg, or MANIFEST.in)", shown,
        )
    data = buf.getvalue()
    if len(data) > LARGE_SHIPMENT_BYTES:
        logger.warning(
            "shipping %.0f MiB of local code to every instance (%s): move data files out of these packages "
            "or install them from an index with packages=[...]",
            len(data) / 2**20, ", ".join(m.name for m in modules),
        )
    return Shipment(data, hashlib.sha256(data).hexdigest(), tuple(modules), keys, tuple(skipped),
                    tuple(left_behind), tuple(config_left_out))


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

"""The workers' environment, seen from the client: what must match, what must travel.

Dask breaks in obscure ways when the client and its workers differ (a pickling error
hours into a run), so before any worker starts on an instance the client probes it,
installs what differs and ships what no index can install
(:class:`InstanceEnvironment`, in ``instance_env``, does that in this order on every boot):

* ``versions``: what must match. The instance's Python (minor) and its ``dask``,
  ``distributed``, ``cloudpickle`` and ``msgpack`` are compared with the client's; what
  differs and the user's ``packages`` are installed; an instance whose Python differs is
  refused, naming both versions and the fixes. A scheduler plugin (:class:`VersionGate`)
  checks every worker again when it registers and closes a mismatched one.
* ``shipping``: what must travel. The user's local and editable packages and modules and
  its non-default dask config go as one archive over SFTP, first on the worker's
  ``PYTHONPATH``.
* ``late_imports``: a module imported after the boot did not travel; a scheduler plugin
  (:class:`LateImportWarning`) says so before a worker dies unpickling its function.
* ``cuda``: what the packages need of the host: a CUDA build of PyTorch asks offers for
  ``cuda_max_good>=`` its CUDA, and a box whose driver is older fails its boot.
* ``secrets``: what must not be stored. ``Secret`` values in ``env`` and ``secret_env``
  stay out of what Vast stores: they travel inside the incarnation file, over SSH.

The common case (the image already matches) costs the probe that runs anyway and no
install; in the emulator the sandbox sees the client's own interpreter, so that is the
path taken there, while the development checkout is hidden and so is shipped.
"""

from __future__ import annotations

from .cuda import CudaVersion, driver_cuda, required_cuda
from .instance_env import InstanceEnvironment
from .late_imports import LateImportWarning
from .secrets import Secret, SecretEnv, redact_urls, split_env
from .shipping import SHIP_DIR, LocalModule, Shipment, looks_secret
from .versions import SYNCED_PACKAGES, ClientEnvironment, VersionGate, python_option

__all__ = [
    "SHIP_DIR",
    "SYNCED_PACKAGES",
    "ClientEnvironment",
    "CudaVersion",
    "InstanceEnvironment",
    "LateImportWarning",
    "LocalModule",
    "Secret",
    "SecretEnv",
    "Shipment",
    "VersionGate",
    "driver_cuda",
    "looks_secret",
    "python_option",
    "redact_urls",
    "required_cuda",
    "split_env",
]

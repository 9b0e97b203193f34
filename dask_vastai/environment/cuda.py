"""The CUDA a CUDA build of PyTorch needs of the host's driver.

A wheel such as ``torch==2.4.0+cu121`` (or any wheel from ``download.pytorch.org/whl/cu121``)
runs only where the NVIDIA driver supports CUDA 12.1 or later; Vast's offers say what their
driver supports in ``cuda_max_good``, and ``nvidia-smi`` says it on the box ("CUDA Version:
12.4"). So the offer query asks for ``cuda_max_good>=`` that version, and a box whose
driver turns out older than its offer said fails its boot with both versions named,
instead of every GPU task failing later with "CUDA driver version is insufficient".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

#: the CUDA builds of these distributions say their CUDA in a local version (``+cu121``)
CUDA_BUILT = ("torch", "torchvision", "torchaudio")
_LOCAL_CUDA = re.compile(r"\+cu(\d{2,3})\b", re.IGNORECASE)
_WHEEL_INDEX = re.compile(r"download\.pytorch\.org/whl/(?:nightly/)?cu(\d{2,3})\b", re.IGNORECASE)
_SMI_CUDA = re.compile(r"CUDA Version:\s*(\d+)\.(\d+)")


@dataclass(frozen=True, order=True)
class CudaVersion:
    """A CUDA version, compared as numbers (12.10 is after 12.9)."""

    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> CudaVersion:
        major, _, minor = str(text).strip().partition(".")
        return cls(int(major), int(minor or 0))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


def _from_tag(digits: str) -> CudaVersion:
    """``"121"`` -> 12.1, ``"118"`` -> 11.8, ``"92"`` -> 9.2: the last digit is the minor."""
    return CudaVersion(int(digits[:-1]), int(digits[-1]))


def required_cuda(packages: Sequence[str], pip_args: Sequence[str] = ()) -> tuple[CudaVersion, str] | None:
    """The CUDA the user's packages need and what says so, or None for no CUDA build.

    From a pinned CUDA build (``torch==2.4.0+cu121``) or a PyTorch CUDA wheel index in
    ``pip_args`` (``--index-url https://download.pytorch.org/whl/cu121``); the highest wins.
    """
    from packaging.requirements import InvalidRequirement, Requirement

    found: list[tuple[CudaVersion, str]] = []
    for spec in packages:
        try:
            req = Requirement(str(spec))
        except InvalidRequirement:
            continue
        if req.name.lower() not in CUDA_BUILT:
            continue
        for clause in req.specifier:
            m = _LOCAL_CUDA.search(clause.version)
            if m:
                found.append((_from_tag(m.group(1)), str(spec)))
    for arg in pip_args:
        m = _WHEEL_INDEX.search(str(arg))
        if m:  # named, not quoted: pip_args may carry an index token
            found.append((_from_tag(m.group(1)), f"the PyTorch wheel index for cu{m.group(1)}"))
    return max(found) if found else None


def driver_cuda(nvidia_smi_output: str) -> CudaVersion | None:
    """The CUDA version the driver supports, from ``nvidia-smi``'s header; None when absent."""
    m = _SMI_CUDA.search(nvidia_smi_output or "")
    return CudaVersion(int(m.group(1)), int(m.group(2))) if m else None

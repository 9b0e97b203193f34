"""The OpenSSH server of an emulated instance: its configuration and per-instance host key.

Each SSH connection is handed by the sandbox's init to a fresh ``sshd -i`` (inetd mode),
so sshd never listens itself and no SSH byte is copied by Python.
"""

from __future__ import annotations

import shutil

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")

#: Paths are inside the sandbox; /run/vast-emu is written by its init.
SSHD_CONFIG = """\
HostKey /run/vast-emu/ssh_host_ed25519_key
AuthorizedKeysFile .ssh/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
AllowStreamLocalForwarding yes
GatewayPorts no
X11Forwarding no
PermitTTY yes
PermitUserEnvironment yes
PrintMotd no
PidFile none
LogLevel INFO
Subsystem sftp internal-sftp
ClientAliveInterval 0
"""


def find_sshd() -> str | None:
    """The OpenSSH server binary, as images that Vast runs ship it; None where absent."""
    for path in SSHD_CANDIDATES:
        if shutil.which(path):
            return path
    return shutil.which("sshd")


def new_host_key() -> tuple[str, str]:
    """A fresh ed25519 host key (OpenSSH private key text, public key line)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    return private, public

"""The OpenSSH server of an emulated instance: its configuration and per-instance host key.

Each SSH connection is handed by the sandbox's init to a fresh ``sshd -i`` (inetd mode),
so sshd never listens itself and no SSH byte is copied by Python.

What a session's environment holds is the variant ``ssh_env``: the container's whole env
(``PermitUserEnvironment`` and ``~/.ssh/environment``), or only what ``SetEnv`` gives
(sshd then starts from its own defaults, as on Vast where SSH sessions do not see the
container's env). No PAM runs, so ``/etc/environment`` is not read.
"""

from __future__ import annotations

import shutil

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")

#: Paths are inside the sandbox; /run/vast-emu is written by its init. ``sshd_config()``
#: adds the lines that vary between sandboxes.
SSHD_CONFIG = """\
HostKey /run/vast-emu/ssh_host_ed25519_key
AuthorizedKeysFile .ssh/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowStreamLocalForwarding yes
GatewayPorts no
X11Forwarding no
PermitTTY yes
PrintMotd no
PidFile none
LogLevel INFO
Subsystem sftp internal-sftp
ClientAliveInterval 0
"""


#: sshd's own PATH for root sessions (Debian's build) plus where the driver's tools are
#: (nvidia-smi: /usr/bin on Vast, /run/vast-emu/bin here)
DEFAULT_SESSION_PATH = "/run/vast-emu/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def sshd_config(set_env: dict[str, str] | None, *, remote_forward: bool = True) -> str:
    """The configuration of one sandbox's sshd.

    ``set_env`` None: sessions get the container's env from ``~/.ssh/environment``; else
    only sshd's defaults overridden by these variables. ``remote_forward`` False refuses
    ``ssh -R`` (the client says "remote port forwarding failed") and still allows ``-L``.
    """
    lines = [SSHD_CONFIG, f"AllowTcpForwarding {'yes' if remote_forward else 'local'}\n"]
    if set_env is None:
        lines.append("PermitUserEnvironment yes\n")
    else:
        lines.append("PermitUserEnvironment no\n")
        if set_env:
            lines.append("SetEnv " + " ".join(f'{k}="{v}"' for k, v in set_env.items()) + "\n")
    return "".join(lines)


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

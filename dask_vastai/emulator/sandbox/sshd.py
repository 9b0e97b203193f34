"""The OpenSSH server of an emulated instance: its configuration and per-instance host keys.

Each SSH connection is handed by the sandbox's init to a fresh ``sshd -i`` (inetd mode),
so sshd never listens itself and no SSH byte is copied by Python.

As in Vast's images, the host keys live in ``/etc/ssh`` (``ssh_host_ed25519_key`` and
``ssh_host_ecdsa_key``, with their ``.pub``), made once per rental and kept across its
reboots, as a container's files are. The fault ``impostor_ssh`` makes the SSH endpoints
present another key (a man in the middle): the instance's ``/etc/ssh`` still shows its own.

What a session's environment holds is the variant ``ssh_env``: the container's whole env
(``PermitUserEnvironment`` and ``~/.ssh/environment``), or only what ``SetEnv`` gives
(sshd then starts from its own defaults, as on Vast where SSH sessions do not see the
container's env). No PAM runs, so ``/etc/environment`` is not read.
"""

from __future__ import annotations

import shutil

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")

#: Paths are inside the sandbox; /run/vast-emu is written by its init. ``sshd_config()``
#: adds the lines that vary between sandboxes.
SSHD_CONFIG = """\
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


#: the image's host keys (inside the sandbox), as OpenSSH's ``ssh-keygen -A`` names them
HOST_KEY_DIR = "/etc/ssh"
HOST_KEY_NAMES = ("ssh_host_ed25519_key", "ssh_host_ecdsa_key")
#: where the key of the fault ``impostor_ssh`` lives: outside /etc/ssh, unknown to the instance
IMPOSTOR_KEY = "/run/vast-emu/impostor_host_key"


def sshd_config(set_env: dict[str, str] | None, *, remote_forward: bool = True,
                host_keys: tuple[str, ...] = tuple(f"{HOST_KEY_DIR}/{n}" for n in HOST_KEY_NAMES)) -> str:
    """The configuration of one sandbox's sshd.

    ``set_env`` None: sessions get the container's env from ``~/.ssh/environment``; else
    only sshd's defaults overridden by these variables. ``remote_forward`` False refuses
    ``ssh -R`` (the client says "remote port forwarding failed") and still allows ``-L``.
    ``host_keys``: the private key files sshd presents (the image's, or an impostor's).
    """
    lines = [*(f"HostKey {k}\n" for k in host_keys), SSHD_CONFIG,
             f"AllowTcpForwarding {'yes' if remote_forward else 'local'}\n"]
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


def new_host_key(kind: str = "ed25519") -> tuple[str, str]:
    """A fresh host key, ``kind`` "ed25519" or "ecdsa" (OpenSSH private key text, public key line)."""
    key = Ed25519PrivateKey.generate() if kind == "ed25519" else ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    return private, public


def new_host_keys() -> dict[str, str]:
    """An image's host key files (name in ``/etc/ssh`` -> text): each key and its ``.pub``."""
    files = {}
    for name in HOST_KEY_NAMES:
        private, public = new_host_key(name.split("_")[2])
        files[name], files[name + ".pub"] = private, public + " root@vast\n"
    return files

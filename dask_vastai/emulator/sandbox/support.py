"""Whether sandboxes can run here, and if not, a sentence saying why and what to do."""

from __future__ import annotations

import os
import sys

from .sshd import find_sshd


def available() -> tuple[bool, str]:
    """(True, "") where sandboxes can run; else (False, the reason and the way out)."""
    if not sys.platform.startswith("linux"):
        return False, (
            f"the emulator's sandboxes are Linux-only (they use Linux namespaces); this is {sys.platform}. "
            "Run the emulator with --no-sandbox (rentals are records only), or inside a Linux VM/container."
        )
    if not os.path.exists("/proc/self/ns/user"):
        return False, "this Linux kernel has no user namespaces (CONFIG_USER_NS); run with --no-sandbox"
    if os.geteuid() != 0:
        for path, bad in (("/proc/sys/kernel/unprivileged_userns_clone", "0"),
                          ("/proc/sys/user/max_user_namespaces", "0"),
                          ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1")):
            try:
                with open(path) as f:
                    value = f.read().strip()
            except OSError:
                continue
            if value == bad:
                return False, (
                    f"unprivileged user namespaces are disabled here ({path} = {value}); the emulator's "
                    "sandboxes need them. Enable them, run as root, or run with --no-sandbox."
                )
        return False, (
            "the emulator's sandboxes run OpenSSH, which needs a range of uids mapped into the sandbox; "
            "without root only one uid can be mapped. Run the emulator as root (in a VM or container), "
            "or with --no-sandbox."
        )
    if find_sshd() is None:
        return False, ("the emulator's sandboxes run OpenSSH's sshd, which is not installed; "
                       "install it (Debian/Ubuntu: apt-get install openssh-server) or run with --no-sandbox")
    return True, ""

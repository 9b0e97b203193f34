"""Whether sandboxes can run here, and if not, a sentence saying why and what to do."""

from __future__ import annotations

import os
import sys


def available() -> tuple[bool, str]:
    """(True, "") where sandboxes can run; else (False, the reason and the way out).

    As root they run OpenSSH; unprivileged (one uid mapped) or without sshd installed,
    asyncssh's server stands in for it (a warning says so at each start).
    """
    if not sys.platform.startswith("linux"):
        return False, (
            f"the emulator's sandboxes are Linux-only (they use Linux namespaces); this is {sys.platform}. "
            "Run the emulator with --runtime record (rentals are records only), or inside a Linux VM/container."
        )
    if not os.path.exists("/proc/self/ns/user"):
        return False, "this Linux kernel has no user namespaces (CONFIG_USER_NS); run with --runtime record"
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
                    "sandboxes need them. Enable them, run as root, or run with --runtime record."
                )
        return True, ""  # one uid only: OpenSSH cannot run, asyncssh's server stands in
    return True, ""

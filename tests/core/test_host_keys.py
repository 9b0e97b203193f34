"""SSH host keys pinned from the instance's own log, and nothing of the user's SSH setup sent.

The instances are the emulator's sandboxes running the real onstart script and OpenSSH: the
loader prints the keys of the image's sshd (``/etc/ssh``) into the container log, which the
client reads before it connects. The impostor is a foreign SSH server on this machine that
records everything a client asks of it: a refused client must not even try to authenticate,
let alone forward a port or open SFTP.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import asyncssh
import pytest

from dask_vastai.bootstrap import HOST_KEYS_MARK, BootstrapConfig, onstart_script, parse_host_keys
from dask_vastai.exceptions import HostKeyMismatch
from dask_vastai.tunnel import ClusterKey, HostKeyPin, SSHEndpoint, TunnelHub
from tests.helpers.sandbox import make_spec, wait_for_log

ED = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFRKQlxoKDaLWOc84xnDwNoOzv9DqfFg51OLFda1rDye"


# ----------------------------------------------------------------------------- the log line
def test_the_last_host_key_line_of_the_log_wins_and_garbage_is_dropped() -> None:
    log = (
        "booting\n"
        f"2024-01-01T00:00:00 {HOST_KEYS_MARK} ssh-rsa AAAAB3Nz SHA256:x\n"
        f"2024-01-01T00:01:00 {HOST_KEYS_MARK} {ED} SHA256:WW6v, ecdsa-sha2-nistp256 AAAA$$ SHA256:y, "
        "no-such-type AAAA SHA256:z\n"
        "a task printed something\n"
    )
    assert parse_host_keys(log) == (ED,)
    assert parse_host_keys("nothing yet\n") is None
    assert parse_host_keys(f"t {HOST_KEYS_MARK} none found\n") == ()


def test_a_pin_without_keys_trusts_the_first_key_only() -> None:
    assert HostKeyPin([ED], source="log").fingerprints() == ["SHA256:WW6vaJ+0angfAu75oR3Y8RyXEKN+wVnZYwWMTdzXJvk"]
    assert HostKeyPin(["not a key"], source="log").first_use
    assert "trust on first use" in repr(HostKeyPin(source="log"))


# ----------------------------------------------------------------------------- sandboxes
class Impostor:
    """A foreign SSH server on 127.0.0.1 that accepts everything and writes down what was asked.

    Its sessions say what the client brought along: a forwarded agent, an X11 display, env.
    """

    def __init__(self) -> None:
        self.events: list[str] = []
        self.key = asyncssh.generate_private_key("ssh-ed25519")
        self.server: asyncssh.SSHAcceptor | None = None

    @property
    def public_key(self) -> str:
        return self.key.export_public_key("openssh").decode().strip()

    async def start(self) -> SSHEndpoint:
        events = self.events

        class Server(asyncssh.SSHServer):
            def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
                events.append("connected")

            def begin_auth(self, username: str) -> bool:
                events.append(f"auth as {username}")
                return True

            def public_key_auth_supported(self) -> bool:
                return True

            def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
                events.append("public key offered")
                return True

            def server_requested(self, listen_host: str, listen_port: int) -> bool:
                events.append(f"remote forward {listen_port}")
                return True

            def connection_requested(self, *args: object) -> bool:
                events.append("local forward")
                return True

            def session_requested(self) -> bool:
                events.append("session")
                return True

        def sftp(chan: asyncssh.SSHServerChannel) -> asyncssh.SFTPServer:
            events.append("sftp")
            return asyncssh.SFTPServer(chan)

        async def session(process: asyncssh.SSHServerProcess) -> None:
            chan = process.channel
            events.append(f"agent={chan.get_agent_path()} x11={chan.get_x11_display()} env={sorted(process.env)}")
            process.exit(0)

        self.server = await asyncssh.listen(
            "127.0.0.1", 0, server_host_keys=[self.key], server_factory=Server, sftp_factory=sftp,
            process_factory=session, agent_forwarding=True, x11_forwarding=True, config=None,
        )
        return SSHEndpoint("127.0.0.1", self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def _boot(runtime, key: ClusterKey, instance_id: int) -> tuple[SSHEndpoint, tuple[str, ...]]:
    """One rental running our onstart: its direct SSH endpoint and the keys its log shows."""
    config = BootstrapConfig("hk", key.public_openssh, "http://127.0.0.1:9", orphan_timeout_s=600,
                             python=sys.executable)
    ends = await runtime.start(make_spec(instance_id, onstart=onstart_script(config)))
    keys = parse_host_keys(await wait_for_log(runtime, instance_id, HOST_KEYS_MARK, timeout_s=30))
    assert keys is not None
    return SSHEndpoint(ends.public_ipaddr, ends.ports[22]), keys


@pytest.mark.sandbox
@pytest.mark.timeout(120)
def test_only_the_keys_in_the_instance_log_are_accepted_first_and_on_reconnect(sandbox, tmp_path: Path) -> None:
    from dask_vastai.emulator.sandbox import SandboxRuntime

    key = ClusterKey.generate("dask-vastai-hk")

    async def main() -> None:
        runtime = SandboxRuntime(tmp_path / "state")
        impostor = Impostor()
        hub = TunnelHub(key, scheduler_port=1)  # no scheduler: the forward of port 1 is never used
        try:
            endpoint, keys = await _boot(runtime, key, 1)
            foreign = await impostor.start()
            # What the log says is what the image's sshd has (both key types it offers).
            assert sorted(k.split()[0] for k in keys) == ["ecdsa-sha2-nistp256", "ssh-ed25519"]
            pin = HostKeyPin(keys, source="the log of instance 1")

            # The first connection, to someone else at the instance's address: refused before
            # authentication, so before any forward, command or file.
            with pytest.raises(HostKeyMismatch) as refused:
                await hub.connect("i1", foreign, timeout_s=20, host_keys=pin)
            assert impostor.events == ["connected"]
            assert impostor.key.get_fingerprint("sha256") in str(refused.value)
            assert pin.fingerprints()[0] in str(refused.value)

            # The real instance is accepted, and shows the same keys in its /etc/ssh.
            link = await hub.connect("i1", endpoint, timeout_s=30, host_keys=pin)
            _, out, _ = await link.run("cat /etc/ssh/ssh_host_*_key.pub", timeout_s=20)
            assert sorted(" ".join(line.split()[:2]) for line in out.splitlines()) == sorted(keys)
            await hub.close_link(link)

            # A reconnect that meets another key is refused the same way.
            impostor.events.clear()
            with pytest.raises(HostKeyMismatch):
                await hub.connect("i1", foreign, timeout_s=20, host_keys=pin)
            assert impostor.events == ["connected"]

            # Without keys in the log: the first key met is pinned, a changed one refused later.
            first_use = HostKeyPin(source="the log of instance 1 (nothing in it)")
            link = await hub.connect("i1", endpoint, timeout_s=30, host_keys=first_use)
            assert not first_use.first_use and first_use.fingerprints()[0] in HostKeyPin(keys, source="x").fingerprints()
            await hub.close_link(link)
            impostor.events.clear()
            with pytest.raises(HostKeyMismatch):
                await hub.connect("i1", foreign, timeout_s=20, host_keys=first_use)
            assert impostor.events == ["connected"]
        finally:
            impostor.close()
            await hub.close()
            await runtime.close()

    asyncio.run(main())


@pytest.mark.sandbox
@pytest.mark.timeout(120)
def test_a_hostile_ssh_config_is_not_read(sandbox, tmp_path: Path, monkeypatch) -> None:
    """A ~/.ssh/config naming a proxy, another user and port: against a real instance, ignored."""
    from dask_vastai.emulator.sandbox import SandboxRuntime

    home = _hostile_home(tmp_path, "ProxyCommand /bin/false\n", monkeypatch)
    key = ClusterKey.generate("dask-vastai-hk")

    async def main() -> str:
        runtime = SandboxRuntime(tmp_path / "state")
        hub = TunnelHub(key, scheduler_port=1)
        try:
            endpoint, keys = await _boot(runtime, key, 2)
            link = await hub.connect("i2", endpoint, timeout_s=30, host_keys=HostKeyPin(keys, source="log"))
            _, out, _ = await link.run('echo "agent=[$SSH_AUTH_SOCK] display=[$DISPLAY] user=$(id -un)"', timeout_s=20)
            return out.strip()
        finally:
            await hub.close()
            await runtime.close()

    assert asyncio.run(main()) == "agent=[] display=[] user=root"
    assert os.environ["HOME"] == str(home)


@pytest.mark.skipif(shutil.which("ssh-agent") is None, reason="needs OpenSSH's ssh-agent")
@pytest.mark.timeout(60)
def test_no_agent_x11_or_env_is_forwarded_even_when_the_users_config_asks(tmp_path: Path, monkeypatch) -> None:
    """The user's config forwards a running agent and X11 and sends every variable: none of it goes."""
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(tmp_path / "agent.sock")], stdout=subprocess.DEVNULL)
    try:
        _hostile_home(tmp_path, "", monkeypatch)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(tmp_path / "agent.sock"))
        monkeypatch.setenv("MY_SECRET_TOKEN", "s3cr3t")
        key = ClusterKey.generate("dask-vastai-hk")

        async def main() -> list[str]:
            server = Impostor()  # here the server we mean to reach: its key is the pinned one
            hub = TunnelHub(key, scheduler_port=1)
            try:
                endpoint = await server.start()
                link = await hub.connect("r", endpoint, timeout_s=20,
                                         host_keys=HostKeyPin([server.public_key], source="test"))
                await link.run("true", timeout_s=10)
                await link.close()
                return server.events
            finally:
                server.close()

        events = asyncio.run(main())
    finally:
        agent.terminate()
        agent.wait()
    assert "auth as root" in events
    assert "agent=None x11=None env=[]" in events, events


def _hostile_home(tmp_path: Path, proxy: str, monkeypatch) -> Path:
    """HOME with a ~/.ssh/config that would send the agent, X11 and env, as another user and port."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(
        f"Host *\n  User nobody\n  Port 1\n  {proxy}  ForwardAgent yes\n  ForwardX11 yes\n"
        "  ForwardX11Trusted yes\n  SendEnv *\n  StrictHostKeyChecking no\n"
    )
    (home / ".ssh" / "known_hosts").write_text(f"* {ED}\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DISPLAY", "127.0.0.1:0")
    return home

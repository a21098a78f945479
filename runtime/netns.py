"""A real, slow link between ranks on one machine: two network namespaces joined by a veth
pair whose two ends are shaped with a token-bucket filter (`tc qdisc ... tbf`).

    with ShapedLink(rate="400mbit") as link:
        link.exec(0, ["torchrun", ...])       # runs inside the first namespace

Ranks in different namespaces talk over the shaped veth; ranks in one namespace over its
loopback. Needs root and iproute2; `ShapedLink.check()` says what is missing. Everything it
creates (two namespaces, which take the veth pair with them) is removed on exit, and also
if a previous run was killed before it could clean up.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

PREFIX = "moedit-bench"
SUBNET = "10.231.77"  # addresses of the two namespaces; they exist only inside this machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LinkError(RuntimeError):
    pass


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode:
        raise LinkError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


class ShapedLink:
    def __init__(self, rate: str = "400mbit", burst: str = "256kb", latency: str = "20ms"):
        self.rate, self.burst, self.latency = rate, burst, latency
        self.namespaces = [f"{PREFIX}-{i}" for i in range(2)]
        self.devices = ["mveth0", "mveth1"]
        self.addresses = [f"{SUBNET}.1", f"{SUBNET}.2"]

    @staticmethod
    def check() -> str | None:
        """Why a shaped link cannot be made here, or None."""
        if os.geteuid() != 0:
            return "the shaped link needs root (network namespaces, veth and tc); run as root or use --link loopback"
        missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
        if missing:
            return f"the shaped link needs iproute2 ({', '.join(missing)} not found): apt-get install iproute2"
        return None

    def describe(self) -> str:
        return (f"2 network namespaces joined by a veth pair, each end shaped with tbf rate {self.rate} "
                f"burst {self.burst} latency {self.latency}")

    def __enter__(self) -> "ShapedLink":
        problem = self.check()
        if problem:
            raise LinkError(problem)
        self._remove()  # left over from a run that was killed
        try:
            for ns in self.namespaces:
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip("link", "add", self.devices[0], "netns", self.namespaces[0], "type", "veth",
                "peer", "name", self.devices[1], "netns", self.namespaces[1])
            for ns, dev, addr in zip(self.namespaces, self.devices, self.addresses):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                                self.rate, "burst", self.burst, "latency", self.latency], check=True,
                               capture_output=True)
        except (LinkError, subprocess.CalledProcessError):
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def exec(self, index: int, command: list[str]) -> list[str]:
        """`command` run inside namespace `index` (0 or 1)."""
        return ["ip", "netns", "exec", self.namespaces[index], *command]

    def env(self, index: int) -> dict[str, str]:
        """Environment for a rank in namespace `index`: gloo uses the veth, not loopback."""
        return {"GLOO_SOCKET_IFNAME": self.devices[index]}

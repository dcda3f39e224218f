"""A real Redis Cluster on loopback for tests: N masters (and replicas), slots assigned by redis-cli."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

try:  # tests/ is a package
    from tests.redis_server import RedisServer, find_redis_server
except ImportError:  # tests/ as a plain directory (see conftest.py)
    from redis_server import RedisServer, find_redis_server  # type: ignore[no-redef,import-not-found]

__all__ = ["LocalCluster"]


def _port_with_free_bus() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port + 10000 > 65535 or port == 6379:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def find_redis_cli() -> str:
    beside = Path(find_redis_server()).with_name("redis-cli")
    if beside.exists():
        return str(beside)
    found = shutil.which("redis-cli")
    if found is None:
        raise RuntimeError("no redis-cli found next to redis-server or on PATH (it creates the test cluster)")
    return found


class LocalCluster:
    def __init__(self, workdir: Path, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 1000) -> None:
        self.workdir = workdir
        self.masters = masters
        self.replicas = replicas
        self.nodes: list[RedisServer] = []
        for index in range(masters * (1 + replicas)):
            node_dir = workdir / f"node{index}"
            node_dir.mkdir(parents=True, exist_ok=True)
            self.nodes.append(RedisServer(node_dir, port=_port_with_free_bus(), extra_args=[
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms), "--cluster-require-full-coverage", "no",
                # Test nodes replicate little and often idle: let any replica take over.
                "--cluster-replica-validity-factor", "0",
            ]))

    @property
    def url(self) -> str:
        seeds = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes[:3])
        return f"redis+cluster://{seeds}"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run([find_redis_cli(), "--cluster", "create", *addresses, "--cluster-replicas",
                        str(self.replicas), "--cluster-yes"], check=True, capture_output=True, timeout=60)
        self.wait_ok()

    def wait_ok(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if all(self._state(node) == "ok" for node in self.nodes if node.running):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the test cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    def _state(self, node: RedisServer) -> str:
        try:
            with redis.Redis(port=node.port, socket_timeout=1) as client:
                info: str = client.execute_command("CLUSTER", "INFO").decode()
        except redis.RedisError:
            return "down"
        for line in info.splitlines():
            if line.startswith("cluster_state:"):
                return line.split(":", 1)[1].strip()
        return "unknown"

    def primaries(self) -> list[RedisServer]:
        found = []
        for node in self.nodes:
            if not node.running:
                continue
            with redis.Redis(port=node.port, socket_timeout=1) as client:
                if client.execute_command("ROLE")[0] == b"master":
                    found.append(node)
        return found

    def flushall(self) -> None:
        for node in self.primaries():
            with redis.Redis(port=node.port, socket_timeout=2) as client:
                client.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            if node.running:
                node.stop()

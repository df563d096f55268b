"""How a sharded worker is laid out: ranks, backend, mode, hosts, and each rank's environment.

MLX's distributed backends read their set-up from the environment, as
``mlx.launch`` writes it: ``MLX_RANK``; for ``ring`` ``MLX_HOSTFILE``, a
JSON file listing each rank's ``ip:port``; for ``nccl`` ``NCCL_HOST_IP``,
``NCCL_PORT`` and ``MLX_WORLD_SIZE``, with one GPU per rank
(``CUDA_VISIBLE_DEVICES``). :func:`rank_environment` writes the same.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

BACKENDS: tuple[str, ...] = ("ring", "nccl")
MODES: tuple[str, ...] = ("tensor", "pipeline")
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


class PlanError(ValueError):
    """A sharding option that cannot work; the message names the flag."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Host:
    """Where one rank runs: ``ssh`` the name to reach it by (None: this
    machine), ``ip`` the address the other ranks reach it at."""

    ssh: str | None
    ip: str

    @property
    def local(self) -> bool:
        return self.ssh is None or self.ssh in LOCAL_HOSTS


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardPlan:
    ranks: int
    backend: str
    mode: str
    hosts: tuple[Host, ...]
    ports: tuple[int, ...]  # ring: one per rank; nccl: ports[0] is rank 0's
    gpus: tuple[str, ...] = ()  # nccl: the GPU each local rank gets

    def device_of(self, rank: int) -> str | None:
        """``CUDA_VISIBLE_DEVICES`` for ``rank`` (nccl only)."""
        if self.backend != "nccl":
            return None
        return self.gpus[rank % len(self.gpus)] if self.gpus else str(rank)


def make_plan(
    *,
    ranks: int,
    backend: str,
    mode: str,
    hostfile: Path | None = None,
    visible_gpus: str | None = None,
) -> ShardPlan:
    """Check the flags against each other and pick the ports."""
    if ranks < 2:
        raise PlanError(f"--ranks: must be 2 or more for a sharded worker, got {ranks}")
    if backend not in BACKENDS:
        raise PlanError(f"--backend: must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if mode not in MODES:
        raise PlanError(f"--shard: must be one of {', '.join(MODES)}, got {mode!r}")
    if backend == "nccl" and mode == "pipeline":
        raise PlanError(
            "--shard pipeline: MLX's NCCL backend has no send/recv, which pipelining needs; "
            "use --shard tensor with nccl, or --backend ring"
        )
    hosts = read_hostfile(hostfile) if hostfile is not None else ()
    if hosts and len(hosts) != ranks:
        raise PlanError(f"--hostfile: lists {len(hosts)} hosts for --ranks {ranks}")
    if not hosts:
        hosts = tuple(Host(ssh=None, ip="127.0.0.1") for _ in range(ranks))
    if not hosts[0].local:
        raise PlanError("--hostfile: the first host is rank 0, this process: it must be local")
    gpus = tuple(g for g in (visible_gpus or "").split(",") if g.strip())
    return ShardPlan(
        ranks=ranks,
        backend=backend,
        mode=mode,
        hosts=hosts,
        ports=free_ports(ranks if backend == "ring" else 1),
        gpus=gpus,
    )


def read_hostfile(path: Path) -> tuple[Host, ...]:
    """``mlx.launch``'s hostfile: a JSON list of ``{"ssh": name, "ips": [ip, ...]}``."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PlanError(f"--hostfile: cannot read {path}: {exc}") from None
    if not isinstance(entries, list) or not entries:
        raise PlanError("--hostfile: must be a JSON list of hosts")
    hosts = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise PlanError(f"--hostfile: [{i}] must be an object")
        ssh = entry.get("ssh")
        ips = entry.get("ips") or []
        if not isinstance(ssh, str) or not ssh or "\0" in ssh or ssh.startswith("-"):
            raise PlanError(f"--hostfile: [{i}].ssh must be a host name")
        if not isinstance(ips, list) or not ips or not all(isinstance(a, str) for a in ips):
            raise PlanError(f"--hostfile: [{i}].ips must be a list of IP addresses")
        try:
            ip = str(ipaddress.ip_address(ips[0]))
        except ValueError:
            raise PlanError(f"--hostfile: [{i}].ips[0] is not an IP address: {ips[0]!r}") from None
        hosts.append(Host(ssh=ssh, ip=ip))
    return tuple(hosts)


def free_ports(n: int) -> tuple[int, ...]:
    """``n`` TCP ports free on this machine now (the ranks bind them shortly after)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return tuple(s.getsockname()[1] for s in sockets)
    finally:
        for s in sockets:
            s.close()


def rank_environment(plan: ShardPlan, rank: int, hostfile: Path) -> dict[str, str]:
    """The variables MLX's backend reads in ``rank``'s process (``hostfile``:
    where the ring's address list is written, see :func:`write_ring_hostfile`)."""
    env = {"MLX_RANK": str(rank), "MLX_WORLD_SIZE": str(plan.ranks)}
    if plan.backend == "ring":
        env["MLX_HOSTFILE"] = str(hostfile)
    else:
        env["NCCL_HOST_IP"] = plan.hosts[0].ip
        env["NCCL_PORT"] = str(plan.ports[0])
    device = plan.device_of(rank)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    return env


def ring_addresses(plan: ShardPlan) -> list[list[str]]:
    return [[f"{h.ip}:{port}"] for h, port in zip(plan.hosts, plan.ports, strict=True)]


def write_ring_hostfile(plan: ShardPlan, directory: Path) -> Path:
    path = directory / "ring.json"
    path.write_text(json.dumps(ring_addresses(plan)))
    os.chmod(path, 0o600)
    return path

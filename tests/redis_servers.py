"""Real redis-server processes for tests, on free loopback ports, always torn down.

`RedisServer` is one process (standalone, or one node of a cluster); `RedisCluster`
starts N primaries with R replicas each and joins them with `redis-cli --cluster
create`, the way envoyproxy/ratelimit's integration tests build theirs. A cluster can
lose a primary (`kill_primary`) and wait for its replica to take over
(`wait_for_failover`).

Every process runs from its own directory, logs to a file there, and the tail of that
log is part of every startup error. Talking to the servers here needs no client
library: a few lines of RESP over a socket, so nothing is left open.
"""

from __future__ import annotations

import contextlib
import random
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self, TypeAlias

HOST = "127.0.0.1"
HASH_SLOTS = 16_384
# A cluster node also listens on its client port + 10000 (the cluster bus).
CLUSTER_BUS_OFFSET = 10_000
# Client ports come from here, so that port and bus port (21000-31999) both stay below
# Linux's default ephemeral range (32768-60999), where outgoing connections take theirs.
_PORT_RANGE = (11_000, 22_000)
_INSTALL_HINT = (
    "install Debian's redis-server package (apt-get install redis-server), "
    "which provides redis-server and redis-cli"
)

Reply: TypeAlias = "str | int | list[Reply] | None"


class RedisNotInstalledError(RuntimeError):
    """redis-server or redis-cli is not on PATH."""


class RedisStartupError(RuntimeError):
    """A server or cluster did not come up; the message carries the log tails."""


class RedisReplyError(RuntimeError):
    """The server answered a command with an error reply."""


class _PortTakenError(RedisStartupError):
    """The server exited because its port (or bus port) was taken meanwhile."""


def executable(name: str) -> str:
    """The full path of a redis binary on PATH, or RedisNotInstalledError."""
    path = shutil.which(name)
    if path is None:
        raise RedisNotInstalledError(f"{name} not found on PATH; {_INSTALL_HINT}")
    return path


# --- free ports -----------------------------------------------------------------------

_port_lock = threading.Lock()
_ports_handed_out: set[int] = set()
# Not the `random` module: hypothesis seeds that one, so every test process would draw
# the same sequence of ports.
_rng = random.SystemRandom()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback port that is free, and whose cluster bus port (+10000) is free too.

    Ports are random, never handed out twice in one process, and both are bind-tested.
    Another process can still take one before redis-server binds it; `RedisServer.start`
    then notices and retries on a fresh port.
    """
    with _port_lock:
        for _ in range(1_000):
            port = _rng.randrange(*_PORT_RANGE)
            if port in _ports_handed_out:
                continue
            if _bindable(port) and _bindable(port + CLUSTER_BUS_OFFSET):
                _ports_handed_out.add(port)
                return port
    raise RuntimeError(f"no free port pair (port, port+{CLUSTER_BUS_OFFSET}) in {_PORT_RANGE}")


# --- a minimal RESP2 client -----------------------------------------------------------


def command(port: int, *args: str | int, timeout_s: float = 2.0) -> Reply:
    """Send one command to 127.0.0.1:port on a fresh connection and return the reply.

    Error replies raise RedisReplyError; a refused or dropped connection raises OSError.
    """
    parts = [str(arg).encode() for arg in args]
    payload = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection((HOST, port), timeout=timeout_s) as sock:
        sock.sendall(payload)
        with sock.makefile("rb") as reader:
            return _read_reply(reader)


def _read_reply(reader: BinaryIO) -> Reply:
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed before a complete reply")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisReplyError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = reader.read(size + 2)
        if len(data) != size + 2:
            raise ConnectionError("connection closed inside a bulk reply")
        return data[:-2].decode()
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_reply(reader) for _ in range(count)]
    raise ConnectionError(f"unexpected reply line {line!r}")


def text(port: int, *args: str | int, timeout_s: float = 2.0) -> str:
    """`command` for commands that answer with one string (INFO, CLUSTER NODES...)."""
    reply = command(port, *args, timeout_s=timeout_s)
    if not isinstance(reply, str):
        raise TypeError(f"{args!r} answered {reply!r}, not a string")
    return reply


def parse_info(info: str) -> dict[str, str]:
    """INFO / CLUSTER INFO text as a dict."""
    fields: dict[str, str] = {}
    for line in info.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            fields[key.strip()] = value.strip()
    return fields


def ping(port: int, timeout_s: float = 0.5) -> bool:
    """True when the server answers PING with PONG (not LOADING, not refused)."""
    try:
        return command(port, "PING", timeout_s=timeout_s) == "PONG"
    except (OSError, RedisReplyError):
        return False


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file, or a note that it does not exist."""
    try:
        with path.open("rb") as log:
            log.seek(0, 2)
            size = log.tell()
            log.seek(max(0, size - 16_384))
            content = log.read().decode(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(content.splitlines()[-lines:])


# --- one server -----------------------------------------------------------------------


class RedisServer:
    """One redis-server process on 127.0.0.1, configured on its command line.

    `directory` holds its data files (nodes-<port>.conf for a cluster node, the AOF when
    `appendonly`) and its log, redis-<port>.log. The port is picked by `start()` unless
    given; once the server has started, `restart()` reuses the same port and directory,
    so a killed cluster primary comes back as itself.
    """

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        appendonly: bool = False,
        cluster: bool = False,
        cluster_node_timeout_ms: int = 5_000,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.directory = directory
        self.appendonly = appendonly
        self.cluster = cluster
        self.cluster_node_timeout_ms = cluster_node_timeout_ms
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None
        self._port = port
        self._port_pinned = port is not None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"RedisServer({self.address if self._port else 'no port'}, {state})"

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server has no port until start()")
        return self._port

    @property
    def address(self) -> str:
        """`127.0.0.1:<port>`, as redis-cli and cluster startup nodes spell it."""
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / f"redis-{self.port}.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def args(self) -> list[str]:
        """The redis-server command line (the whole configuration)."""
        args = [
            executable("redis-server"),
            "--port", str(self.port),
            "--bind", HOST,
            "--dir", str(self.directory),
            "--daemonize", "no",
            "--protected-mode", "no",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            # Replicas sync at once (the default waits 5 s for more replicas to join).
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        if self.cluster:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{self.port}.conf",
                "--cluster-node-timeout", str(self.cluster_node_timeout_ms),
            ]  # fmt: skip
        return args + self.extra_args

    def start(self, timeout_s: float = 10.0) -> Self:
        """Start the process and return once it answers PING.

        Raises RedisStartupError with the log tail if it exits or does not answer within
        `timeout_s`. A port taken by someone else meanwhile means another try on a fresh
        port, unless the port is pinned (given, or kept for `restart()`).
        """
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self._port_pinned else 5
        for attempt in range(1, attempts + 1):
            if not self._port_pinned:
                self._port = free_port()
            self._spawn()
            try:
                self._wait_ping(timeout_s)
            except _PortTakenError:
                if attempt == attempts:
                    raise
                continue
            self._port_pinned = True
            return self
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        with self.log_path.open("ab") as log:
            log.write(f"--- runcap tests: {shlex.join(self.args())}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.args(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def _wait_ping(self, timeout_s: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while not ping(self.port):
            code = self.process.poll()
            if code is not None:
                log = tail(self.log_path)
                error = _PortTakenError if "Address already in use" in log else RedisStartupError
                raise error(f"redis-server on port {self.port} exited with code {code}:\n{log}")
            if time.monotonic() > deadline:
                self.kill()
                raise RedisStartupError(
                    f"redis-server on port {self.port} did not answer PING within "
                    f"{timeout_s:g} s:\n{tail(self.log_path)}"
                )
            time.sleep(0.01)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SHUTDOWN NOSAVE NOW (no waiting for lagging replicas); SIGKILL if need be."""
        if self.process is None:
            return
        if self.process.poll() is None:
            # The server closes the connection as it exits; an error reply means it refused.
            with contextlib.suppress(OSError, RedisReplyError):
                command(self.port, "SHUTDOWN", "NOSAVE", "NOW")
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process.wait()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final write; the files stay for `restart()`."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def restart(self, timeout_s: float = 10.0) -> Self:
        """Stop if running, then start again on the same port with the same directory."""
        if self._port is None:
            raise RuntimeError("restart() needs a server that has started once")
        self.stop()
        self._port_pinned = True
        return self.start(timeout_s)

    def info(self, section: str = "") -> dict[str, str]:
        return parse_info(text(self.port, "INFO", *([section] if section else [])))

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


# --- a cluster ------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterNodeLine:
    """One line of CLUSTER NODES: a node as one member of the cluster sees it."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    slots: tuple[str, ...]

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        """Agreed to have failed (`fail`), or not a full member yet."""
        return bool(self.flags & {"fail", "handshake", "noaddr"})

    @property
    def failing(self) -> bool:
        """`failed`, or only suspected so far by this node (`fail?`)."""
        return self.failed or "fail?" in self.flags

    def owns(self, slot: int) -> bool:
        for spec in self.slots:
            if spec.startswith("["):  # a slot being imported or migrated
                continue
            first, _, last = spec.partition("-")
            if int(first) <= slot <= int(last or first):
                return True
        return False


def parse_cluster_nodes(nodes: str) -> list[ClusterNodeLine]:
    lines = []
    for line in nodes.splitlines():
        if not line.strip():
            continue
        fields = line.split()
        address = fields[1].split("@", 1)[0].split(",", 1)[0]
        lines.append(
            ClusterNodeLine(
                node_id=fields[0],
                port=int(address.rsplit(":", 1)[1] or 0),
                flags=frozenset(fields[2].split(",")),
                master_id=None if fields[3] == "-" else fields[3],
                slots=tuple(fields[8:]),
            )
        )
    return lines


class RedisCluster:
    """`primaries` primaries with `replicas_per_primary` replicas each, on loopback.

    `start()` creates a fresh temporary directory (one subdirectory per node), starts the
    nodes, joins them with `redis-cli --cluster create` and waits until the cluster is
    whole: every node in `cluster_state:ok` with all 16384 slots served, every node
    seeing the same topology, every replica linked to its primary. `stop()` shuts every
    node down and removes the directory.

    Node roles come from CLUSTER NODES, so they stay right after a failover. Ports in
    and out are client ports (ints); `startup_nodes` spells them `127.0.0.1:<port>`.
    """

    def __init__(
        self,
        primaries: int = 3,
        replicas_per_primary: int = 0,
        *,
        node_timeout_ms: int | None = None,
        appendonly: bool = False,
    ) -> None:
        if primaries < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 primaries")
        self.primary_count = primaries
        self.replicas_per_primary = replicas_per_primary
        # Short with replicas, so a failover takes ~2-3 s. Long without: there is nothing
        # to fail over to, and a node that looks dead for a while (a long script, a busy
        # CI machine) would take its slots down with it.
        self.node_timeout_ms = node_timeout_ms or (1_000 if replicas_per_primary else 30_000)
        self.appendonly = appendonly
        self.directory: Path | None = None
        self.nodes: list[RedisServer] = []
        self._killed: dict[int, tuple[str, list[int]]] = {}

    def __repr__(self) -> str:
        return f"RedisCluster({', '.join(repr(node) for node in self.nodes)})"

    # --- lifecycle ---

    def start(self, timeout_s: float = 60.0) -> Self:
        """Start and join the nodes; on any failure stop everything and raise."""
        if self.directory is not None:
            raise RuntimeError("the cluster has already been started")
        redis_cli = executable("redis-cli")
        executable("redis-server")
        self.directory = Path(tempfile.mkdtemp(prefix="runcap-redis-cluster-"))
        total = self.primary_count * (1 + self.replicas_per_primary)
        try:
            for index in range(total):
                node = RedisServer(
                    self.directory / f"node-{index}",
                    appendonly=self.appendonly,
                    cluster=True,
                    cluster_node_timeout_ms=self.node_timeout_ms,
                )
                self.nodes.append(node)
                node.start()
            argv = [redis_cli, "--cluster", "create", *(node.address for node in self.nodes)]
            argv += ["--cluster-replicas", str(self.replicas_per_primary), "--cluster-yes"]
            create = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
            if create.returncode != 0:
                raise RedisStartupError(
                    f"redis-cli --cluster create exited with {create.returncode}:\n"
                    f"{create.stdout}{create.stderr}\n{self.log_tails()}"
                )
            self.wait_until_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Shut every node down (SIGKILL if need be) and remove the directory."""
        try:
            for node in self.nodes:
                node.stop()
        finally:
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # --- addresses and topology ---

    @property
    def startup_nodes(self) -> list[str]:
        """`127.0.0.1:<port>` of every running node, for cluster clients."""
        return [node.address for node in self.nodes if node.running]

    @property
    def url(self) -> str:
        """`redis://` URL of one running node; cluster clients discover the rest."""
        return self._live()[0].url

    def node(self, port: int) -> RedisServer:
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(f"no node on port {port}")

    def view(self, port: int | None = None) -> list[ClusterNodeLine]:
        """CLUSTER NODES as the node on `port` (default: the first running one) sees it."""
        return parse_cluster_nodes(text(port or self._live()[0].port, "CLUSTER", "NODES"))

    def primaries(self) -> list[int]:
        """Ports of the primaries serving slots, ascending (failed ones left out)."""
        return sorted(
            line.port for line in self.view() if line.is_primary and line.slots and not line.failed
        )

    def replicas_of(self, primary: int) -> list[int]:
        """Ports of the primary's replicas, ascending (failed ones left out)."""
        view = self.view()
        primary_id = _id_of(view, primary)
        return sorted(
            line.port for line in view if line.master_id == primary_id and not line.failed
        )

    def replica_of(self, primary: int) -> int:
        """The port of one replica of the primary on port `primary`."""
        replicas = self.replicas_of(primary)
        if not replicas:
            raise LookupError(f"primary {primary} has no replica (that has not failed)")
        return replicas[0]

    def slot_owner(self, slot: int) -> int:
        """The port of the primary serving `slot` (see `redis.crc.key_slot`)."""
        for line in self.view():
            if line.is_primary and not line.failed and line.owns(slot):
                return line.port
        raise LookupError(f"no primary (that has not failed) serves slot {slot}")

    # --- faults ---

    def kill_primary(self, port: int) -> None:
        """SIGKILL the primary on `port`; `wait_for_failover(port)` waits for a successor."""
        view = self.view()
        node_id = _id_of(view, port)
        if port not in self.primaries():
            raise ValueError(f"node {port} is not a serving primary")
        replicas = [line.port for line in view if line.master_id == node_id]
        self._killed[port] = (node_id, replicas)
        self.node(port).kill()

    def wait_for_failover(self, old_primary: int, timeout_s: float = 30.0) -> int:
        """Wait until a replica of the killed primary serves its slots; return its port.

        Done means: every running node is in cluster_state:ok with all slots served,
        and every one of them sees the same former replica as a healthy primary with
        slots. The old primary should have died through `kill_primary`, which notes
        its replicas; otherwise they are looked up now (too late once promoted).
        """
        if old_primary in self._killed:
            old_id, candidates = self._killed[old_primary]
        else:
            view = self.view()
            old_id = _id_of(view, old_primary)
            candidates = [line.port for line in view if line.master_id == old_id]
        if not candidates:
            raise LookupError(f"primary {old_primary} had no replica to fail over to")
        deadline = time.monotonic() + timeout_s
        while True:
            reason, promoted = self._failover_state(old_id, candidates)
            if promoted is not None:
                return promoted
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no replica of {old_primary} took over within {timeout_s:g} s "
                    f"({reason}):\n{self.log_tails()}"
                )
            time.sleep(0.05)

    def _failover_state(self, old_id: str, candidates: list[int]) -> tuple[str, int | None]:
        promoted: set[int] = set()
        for node in self._live():
            try:
                info = parse_info(text(node.port, "CLUSTER", "INFO"))
                view = parse_cluster_nodes(text(node.port, "CLUSTER", "NODES"))
            except (OSError, RedisReplyError) as error:
                return f"{node.address}: {error}", None
            if reason := _unhealthy(node, info):
                return reason, None
            if any(line.node_id == old_id and line.slots for line in view):
                return f"{node.address} still sees the old primary serving slots", None
            promoted |= {
                line.port
                for line in view
                if line.port in candidates and line.is_primary and line.slots and not line.failing
            }
        if len(promoted) != 1:
            return f"promoted replicas seen: {sorted(promoted)}", None
        return "", promoted.pop()

    # --- readiness ---

    def wait_until_ready(self, timeout_s: float = 30.0) -> None:
        """Wait until the running nodes form a whole, consistent cluster.

        Also usable after restarting a killed node (it rejoins as a replica).
        """
        deadline = time.monotonic() + timeout_s
        while (reason := self._not_ready()) is not None:
            if time.monotonic() > deadline:
                raise RedisStartupError(
                    f"cluster not ready within {timeout_s:g} s ({reason}):\n{self.log_tails()}"
                )
            time.sleep(0.05)

    def _not_ready(self) -> str | None:
        """Why the running nodes are not a ready cluster yet, or None when they are."""
        live = self._live()
        live_ports = {node.port for node in live}
        topologies: set[frozenset[tuple[int, bool, int | None, tuple[str, ...]]]] = set()
        for node in live:
            try:
                info = parse_info(text(node.port, "CLUSTER", "INFO"))
                view = parse_cluster_nodes(text(node.port, "CLUSTER", "NODES"))
                replication = node.info("replication")
            except (OSError, RedisReplyError) as error:
                return f"{node.address}: {error}"
            if reason := _unhealthy(node, info):
                return reason
            seen = {line.port: line for line in view if line.port in live_ports}
            if len(seen) != len(live_ports):
                return f"{node.address} knows {sorted(seen)} of {sorted(live_ports)}"
            if failing := [line.port for line in seen.values() if line.failing]:
                return f"{node.address} sees {failing} as failing or joining"
            ports_by_id = {line.node_id: line.port for line in view}
            topologies.add(
                frozenset(
                    (
                        line.port,
                        line.is_primary,
                        ports_by_id.get(line.master_id or ""),
                        line.slots,
                    )
                    for line in seen.values()
                )
            )
            if replication.get("role") == "slave" and (
                replication.get("master_link_status") != "up"
                or replication.get("master_sync_in_progress") != "0"
            ):
                return f"replica {node.address} link is {replication.get('master_link_status')}"
        if len(topologies) != 1:
            return "the nodes do not agree on the topology yet"
        serving = [entry for entry in next(iter(topologies)) if entry[1] and entry[3]]
        if len(serving) != self.primary_count:
            return f"{len(serving)} primaries serve slots, expected {self.primary_count}"
        return None

    def _live(self) -> list[RedisServer]:
        live = [node for node in self.nodes if node.running]
        if not live:
            raise RuntimeError("no node of the cluster is running")
        return live

    def log_tails(self, lines: int = 15) -> str:
        """The last lines of every node's log, for error messages."""
        return "\n".join(
            f"--- {node.log_path} ---\n{tail(node.log_path, lines)}"
            for node in self.nodes
            if node._port is not None
        )


def _id_of(view: list[ClusterNodeLine], port: int) -> str:
    for line in view:
        if line.port == port:
            return line.node_id
    raise KeyError(f"no node on port {port} in the cluster")


def _unhealthy(node: RedisServer, cluster_info: dict[str, str]) -> str | None:
    state = cluster_info.get("cluster_state")
    slots_ok = cluster_info.get("cluster_slots_ok")
    if state != "ok" or slots_ok != str(HASH_SLOTS):
        return f"{node.address}: cluster_state={state} cluster_slots_ok={slots_ok}"
    return None

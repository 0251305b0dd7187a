"""Throwaway etcd on free ports, for the tests and for `fastlane bench`: one server
(`EtcdServer`) or a cluster of several members (`EtcdCluster`, for leader-loss tests).

Why a real etcd and not a fake: the interesting failures (compaction, restarts, lease expiry,
auth tokens that die with the server) only exist in the real thing, and etcd starts in well
under a second. Everything here is synchronous on purpose, so it can be used from pytest
fixtures and from the bench driver alike without an event loop.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO

_NOT_FOUND = "etcd not found: apt-get install -y etcd-server etcd-client"


@dataclass(frozen=True)
class ServerTLS:
    """Files for serving clients over TLS; with client_cert_auth, clients must present a cert
    signed by trusted_ca_file (what flannel's functional suite does)."""

    cert_file: str
    key_file: str
    trusted_ca_file: str
    client_cert_auth: bool = True
    # The client cert etcdctl uses to talk to this server (needed when client_cert_auth is on).
    client_cert_file: str | None = None
    client_key_file: str | None = None


def _free_port(host: str, avoid: set[int]) -> int:
    """Ask the kernel for a free port; the etcd well-known ports are never handed out because
    something else on the machine (a real etcd) may want them later."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, 0))
            except OSError:
                s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in (2379, 2380, 4001) and port not in avoid:
            return port
    raise RuntimeError("could not find a free TCP port for etcd")


def _one_line(text: str, limit: int = 400) -> str:
    line = " | ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class EtcdServer:
    """One etcd process we own: started on free client and peer ports, killed only by its PID."""

    def __init__(
        self,
        data_dir: str | None = None,
        host: str = "127.0.0.1",
        netns: str | None = None,
        name: str = "fastlane-test",
        *,
        tls: ServerTLS | None = None,
        extra_args: tuple[str, ...] = (),
        initial_cluster: str | None = None,
        cluster_token: str | None = None,
    ) -> None:
        # initial_cluster ("name=http://h:p,..."): this server is one member of a cluster
        # (see EtcdCluster, which also fixes its ports before start).
        self.initial_cluster = initial_cluster
        self.cluster_token = cluster_token
        self.host = host
        self.netns = netns
        self.name = name
        self.tls = tls
        self.extra_args = tuple(extra_args)
        self._given_data_dir = data_dir
        self._tmp_dir: str | None = None
        self._data_dir: str | None = data_dir
        self._log_path: str | None = None
        self._client_port: int | None = None
        self._peer_port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: BinaryIO | None = None

    # -- facts about the running server -------------------------------------------------------

    @property
    def client_port(self) -> int:
        if self._client_port is None:
            raise RuntimeError("etcd server not started")
        return self._client_port

    @property
    def peer_port(self) -> int:
        if self._peer_port is None:
            raise RuntimeError("etcd server not started")
        return self._peer_port

    @property
    def endpoint(self) -> str:
        """The client URL in flanneld's -etcd-endpoints form."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.client_port}"

    @property
    def data_dir(self) -> str:
        if self._data_dir is None:
            raise RuntimeError("etcd server not started")
        return self._data_dir

    @property
    def log_path(self) -> str | None:
        return self._log_path

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        if not self._log_path or not os.path.exists(self._log_path):
            return ""
        with open(self._log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    # -- lifecycle ------------------------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        if self._data_dir is None:
            self._tmp_dir = tempfile.mkdtemp(prefix="fastlane-etcd-")
            self._data_dir = os.path.join(self._tmp_dir, "data")
            self._log_path = os.path.join(self._tmp_dir, "etcd.log")
        elif self._log_path is None:
            try:
                os.makedirs(self._data_dir, exist_ok=True)
            except OSError as exc:
                raise RuntimeError(
                    f"etcd data dir {self._data_dir!r} is unusable: {exc.strerror or exc}"
                ) from None
            # Beside the data dir, not in it: etcd warns about foreign files in its data dir.
            self._log_path = os.path.abspath(self._data_dir).rstrip("/") + ".etcd.log"

    def _command(self) -> list[str]:
        scheme = "https" if self.tls else "http"
        client = f"{scheme}://{self.host}:{self._client_port}"
        peer = f"http://{self.host}:{self._peer_port}"
        cmd = [
            "etcd",
            "--name",
            self.name,
            "--data-dir",
            self.data_dir,
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            self.initial_cluster or f"{self.name}={peer}",
            "--initial-cluster-state",
            "new",
            # A test server holds a few keys; keep its disk and memory footprint small.
            "--quota-backend-bytes",
            str(256 * 1024 * 1024),
            "--snapshot-count",
            "10000",
        ]
        if self.tls:
            cmd += [
                "--cert-file",
                self.tls.cert_file,
                "--key-file",
                self.tls.key_file,
                "--trusted-ca-file",
                self.tls.trusted_ca_file,
            ]
            if self.tls.client_cert_auth:
                cmd.append("--client-cert-auth")
        if self.cluster_token:
            cmd += ["--initial-cluster-token", self.cluster_token]
        cmd += list(self.extra_args)
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        return cmd

    def start(self, timeout: float = 20.0) -> None:
        """Start etcd and wait until it answers; RuntimeError (one line + log tail) otherwise."""
        if self.running():
            return
        if shutil.which("etcd") is None or shutil.which("etcdctl") is None:
            raise RuntimeError(_NOT_FOUND)
        self._prepare_dirs()
        fixed_ports = self._client_port is not None
        attempts = 1 if fixed_ports else 3
        last_error = ""
        for _ in range(attempts):
            if not fixed_ports:
                self._client_port = _free_port(self.host, set())
                self._peer_port = _free_port(self.host, {self._client_port})
            try:
                self._spawn_and_wait(timeout)
                return
            except RuntimeError as exc:
                last_error = str(exc)
                self._terminate(signal.SIGKILL)
                # Another process grabbed one of the ports between our probe and etcd's bind.
                if "address already in use" not in self.log_tail(40):
                    break
        raise RuntimeError(last_error)

    def _spawn_and_wait(self, timeout: float) -> None:
        self._spawn()
        self._wait_healthy(timeout)

    def _spawn(self) -> None:
        assert self._log_path is not None
        log_file = open(self._log_path, "ab")  # noqa: SIM115 - lives as long as the process
        log_file.write(f"--- fastlane: starting etcd at {time.ctime()}\n".encode())
        log_file.flush()
        self._log_file = log_file
        try:
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C aimed at pytest must not kill it mid-test
            )
        except FileNotFoundError as exc:
            raise RuntimeError(_NOT_FOUND) from exc

    def _wait_healthy(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                tail = _one_line(self.log_tail(6))
                raise RuntimeError(
                    f"etcd exited with status {self._proc.returncode} during start-up: {tail}"
                )
            if self._healthy():
                return
            if time.monotonic() > deadline:
                tail = _one_line(self.log_tail(6))
                raise RuntimeError(f"etcd did not become healthy within {timeout:.0f}s: {tail}")
            time.sleep(0.1)

    def _healthy(self) -> bool:
        # A TCP connect first: cheaper than forking etcdctl while etcd is still booting.
        try:
            if not self.netns:
                with socket.create_connection((self.host, self.client_port), timeout=0.5):
                    pass
        except OSError:
            return False
        # `endpoint status` rather than `endpoint health`: health does a read that fails once
        # auth is enabled, status needs no credentials. A leader means raft is up.
        try:
            out = self._run_etcdctl(
                ("endpoint", "status", "-w", "json"), timeout=3.0, command_timeout="1s"
            )
            return any(item.get("Status", {}).get("leader", 0) for item in json.loads(out))
        except (RuntimeError, ValueError, AttributeError, TypeError):
            return False

    def _terminate(self, sig: int, grace: float = 5.0) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; only ever our own PID. Idempotent."""
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, as in a crash or power loss (for outage tests)."""
        self._terminate(signal.SIGKILL, grace=10.0)

    def restart(self, timeout: float = 20.0) -> None:
        """Stop and start again on the same ports with the same data."""
        self.stop()
        self.start(timeout)

    def cleanup(self) -> None:
        """Stop and remove the temporary directory if we made it."""
        self.stop()
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None
            self._data_dir = self._given_data_dir
            self._log_path = None
            self._client_port = self._peer_port = None

    def __enter__(self) -> EtcdServer:
        try:
            self.start()
        except BaseException:
            self.cleanup()  # a failed start must not leave its temp dir behind
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- etcdctl ---------------------------------------------------------------------------------

    def etcdctl(self, *args: str, timeout: float = 15.0) -> str:
        """Run `etcdctl` (API v3) against this server and return its stdout; a test oracle that
        shares no code with fastlane's own client."""
        return self._run_etcdctl(args, timeout=timeout)

    def _run_etcdctl(
        self, args: tuple[str, ...], timeout: float, command_timeout: str = "5s"
    ) -> str:
        cmd = [
            "etcdctl",
            f"--endpoints={self.host}:{self.client_port}",
            "--dial-timeout=2s",
            f"--command-timeout={command_timeout}",
        ]
        if self.tls:
            cmd += [f"--cacert={self.tls.trusted_ca_file}"]
            if self.tls.client_cert_file and self.tls.client_key_file:
                cmd += [f"--cert={self.tls.client_cert_file}", f"--key={self.tls.client_key_file}"]
        cmd += list(args)
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        env = dict(os.environ, ETCDCTL_API="3")
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, timeout=timeout, check=False)
        except FileNotFoundError as exc:
            raise RuntimeError(_NOT_FOUND) from exc
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"etcdctl {' '.join(args)}: timed out after {timeout:.0f}s") from exc
        if res.returncode != 0:
            err = _one_line(res.stderr.decode("utf-8", "replace") or res.stdout.decode())
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {err}")
        return res.stdout.decode("utf-8", "replace")


class EtcdCluster:
    """Several etcd processes forming one cluster (all on `host`, distinct ports), for tests
    that kill the leader or a follower, or lose all data. Members are EtcdServers; each is
    only ever signalled by its own PID."""

    def __init__(
        self,
        size: int = 3,
        host: str = "127.0.0.1",
        netns: str | None = None,
        name: str = "fastlane-cluster",
    ) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one member")
        self.host, self.netns, self.name = host, netns, name
        self._generation = 0
        self.members = [EtcdServer(host=host, netns=netns, name=f"{name}-{i}") for i in range(size)]

    @property
    def endpoints(self) -> str:
        """Every member's client URL, comma separated (flanneld's -etcd-endpoints)."""
        return ",".join(m.endpoint for m in self.members)

    # What a daemon is given as -etcd-endpoints, named as on EtcdServer.
    endpoint = endpoints

    def pid(self, index: int) -> int | None:
        return self.members[index].pid

    def _assign(self) -> None:
        used: set[int] = set()
        for m in self.members:
            if m._client_port is None:
                m._client_port = _free_port(self.host, used)
                used.add(m._client_port)
                m._peer_port = _free_port(self.host, used)
                used.add(m._peer_port)
            else:
                used |= {m._client_port, m.peer_port}
        spec = ",".join(f"{m.name}=http://{self.host}:{m.peer_port}" for m in self.members)
        self._generation += 1
        for m in self.members:
            m.initial_cluster = spec
            m.cluster_token = f"{self.name}-{self._generation}"

    def start(self, timeout: float = 30.0) -> None:
        """Start every member (together: a member is healthy only once a quorum elected a
        leader) and wait until each answers with a leader."""
        if shutil.which("etcd") is None or shutil.which("etcdctl") is None:
            raise RuntimeError(_NOT_FOUND)
        if not any(m.running() for m in self.members):
            self._assign()
        todo = [m for m in self.members if not m.running()]
        for m in todo:
            m._prepare_dirs()
            m._spawn()
        try:
            for m in todo:
                m._wait_healthy(timeout)
        except RuntimeError:
            for m in todo:
                m._terminate(signal.SIGKILL)
            raise

    def leader(self) -> int:
        """Index of the member that is the raft leader now (RuntimeError if none answers so)."""
        out = self.etcdctl("endpoint", "status", "-w", "json", "--cluster=false", timeout=10)
        ids: dict[str, int] = {}
        leader_id = 0
        for item in json.loads(out):
            status = item.get("Status", {})
            ids[item.get("Endpoint", "")] = int(status.get("header", {}).get("member_id", 0))
            leader_id = int(status.get("leader", 0)) or leader_id
        for i, m in enumerate(self.members):
            if leader_id and ids.get(f"{m.host}:{m.client_port}") == leader_id:
                return i
        raise RuntimeError(f"no member reports itself as leader: {_one_line(out)}")

    def kill(self, index: int) -> None:
        """SIGKILL one member (a crash)."""
        self.members[index].kill()

    def start_member(self, index: int, timeout: float = 20.0) -> None:
        """Start a killed member again with its data (it rejoins the cluster)."""
        self.members[index].start(timeout)

    def wipe(self, timeout: float = 30.0) -> None:
        """All data lost: kill every member, delete the data dirs, start a new, empty cluster
        on the same endpoints."""
        for m in self.members:
            m.kill()
        for m in self.members:
            if m._data_dir is not None:
                shutil.rmtree(m._data_dir, ignore_errors=True)
        self._assign()
        self.start(timeout)

    def etcdctl(self, *args: str, timeout: float = 15.0) -> str:
        """etcdctl against every live member's endpoint (works while one is down)."""
        live = [m for m in self.members if m.running()] or self.members
        cmd = [
            "etcdctl",
            f"--endpoints={','.join(f'{m.host}:{m.client_port}' for m in live)}",
            "--dial-timeout=2s",
            "--command-timeout=5s",
            *args,
        ]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        env = dict(os.environ, ETCDCTL_API="3")
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"etcdctl {' '.join(args)}: timed out after {timeout:.0f}s") from exc
        if res.returncode != 0:
            err = _one_line(res.stderr.decode("utf-8", "replace") or res.stdout.decode())
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {err}")
        return res.stdout.decode("utf-8", "replace")

    def cleanup(self) -> None:
        for m in self.members:
            m.cleanup()

    def __enter__(self) -> EtcdCluster:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

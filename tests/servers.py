"""Servers the tests start for themselves, each on loopback on a free port, in a temporary folder: PostgreSQL
(Debian's server binaries; `.ci/run` installs them), moto's S3 API server (the dev extra) and Redis (Debian's
`redis-server`; `.ci/run` installs it). Without a server's binaries, the tests that need it skip."""

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(ready, server: subprocess.Popen, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        assert server.poll() is None and time.monotonic() < deadline, f"{what} did not start"
        time.sleep(0.1)


def server_binaries() -> Path | None:
    """The newest PostgreSQL server: Debian installs each major version in /usr/lib/postgresql/<version>/bin."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: float(p.parts[-3]))
    initdb = debian[-1] if debian else shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def server_user() -> list[str]:
    """The prefix that runs server commands as a user they accept: initdb and postgres refuse root."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root, and there is no 'postgres' user to run PostgreSQL as (initdb refuses root)")
    return ["runuser", "-u", "postgres", "--"]


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path  # owned by the server's user; holds the cluster, its socket and its log
    port: int
    as_user: list[str]

    @property
    def data(self) -> Path:
        return self.root / "data"

    def run(self, tool: str, *args: str) -> None:
        command = [*self.as_user, str(self.bin_dir / tool), *args]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            log = self.root / "server.log"
            raise RuntimeError(f"{' '.join(command)}:\n{done.stderr}\n{log.read_text() if log.exists() else ''}")

    def pg_ctl(self, action: str) -> None:
        options = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root}"
        self.run("pg_ctl", action, "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-o", options)

    def pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def create_database(self) -> str:
        name = f"dagster_{uuid.uuid4().hex[:8]}"
        self.run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        # psycopg2 (what dagster-postgres installs): SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3.
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = server_binaries()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb); on Debian: apt-get install postgresql")
    as_user = server_user()
    root = Path(tempfile.mkdtemp(prefix="edge-quant-postgres-"))
    if as_user:
        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
    server = PostgresServer(bin_dir, root, free_port(), as_user)
    try:
        server.run(
            "initdb", "-D", str(server.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"
        )
        server.pg_ctl("start")
        yield server
    finally:
        if (server.data / "postmaster.pid").exists():
            server.pg_ctl("stop")
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def moto_server(log_dir: Path) -> Iterator[str]:
    """moto's S3 server in a process of its own; yields its endpoint URL."""
    port = free_port()
    with (log_dir / "moto.log").open("w") as log:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=log,
        )
    endpoint = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return True
        except OSError:
            return False

    try:
        wait_until(answers, server, "moto_server")
        yield endpoint
    finally:
        server.terminate()
        server.wait()


@contextmanager
def redis_server(log_dir: Path) -> Iterator[str]:
    """A Redis server with nothing persisted; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server; on Debian: apt-get install redis-server")
    port = free_port()
    with (log_dir / "redis.log").open("w") as log:
        server = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
            stdout=log,
            stderr=log,
            cwd=log_dir,
        )

    def answers() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_until(answers, server, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait()

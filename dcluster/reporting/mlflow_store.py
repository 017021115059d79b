"""The SQLite MLflow store under runs_root: created whole or not at all.

MLflow builds a new SQLite store in place: it creates the tables, then runs some fifty schema
migrations, for several seconds. A process killed in that window leaves a half-migrated file
that MLflow can neither use nor finish ("table scorers already exists"), and every later run
in that runs root fails on it; two runs started together on a fresh runs root race through
the same migrations in one file. So dcluster builds the store itself, in a temp file beside
it, under a lock file, and renames the complete database into place: a kill leaves either no
store or a whole one, and a second creator waits for the first and uses its store.

A store that already holds runs is never touched. An empty, half-migrated store (left by an
older dcluster, or by MLflow itself) is moved aside and rebuilt, with a warning.
"""
from __future__ import annotations

import fcntl
import logging
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from dcluster.core.atomic import publish, remove_stale_temps, temp_path
from dcluster.core.config import Config

log = logging.getLogger("dcluster.reporting.tracking")

SQLITE_PREFIX = "sqlite:///"


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a SQLite tracking URI; None for any other store (a server)."""
    return Path(uri[len(SQLITE_PREFIX):]) if uri.startswith(SQLITE_PREFIX) else None


def ensure_store(db: Path, artifact_root: str) -> None:
    """Make ``db`` a complete MLflow store, creating it if needed; see the module doc.
    ``artifact_root`` is the artifact location of MLflow's "Default" experiment."""
    if _complete(db):
        return
    with _locked(db.with_name(f"{db.name}.lock")):
        if _complete(db):  # another process built it while this one waited
            return
        if db.exists():
            if _holds_runs(db):
                return  # an older schema with runs: MLflow's error says `mlflow db upgrade`
            _move_aside(db)
        remove_stale_temps(db.parent, db.name)  # of creators killed while holding the lock
        tmp = temp_path(db)
        log.info("creating the MLflow store %s (once per runs root)", db)
        try:
            _build(tmp, artifact_root)
            publish(tmp, db)
        finally:
            tmp.unlink(missing_ok=True)


def _schema_head() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def _read(db: Path, query: str) -> Optional[tuple]:
    """The first row of ``query`` on ``db``, or None where the table it reads is missing."""
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return connection.execute(query).fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        connection.close()


def _complete(db: Path) -> bool:
    """Whether ``db`` exists and holds the schema this MLflow expects, fully migrated."""
    if not db.is_file() or db.stat().st_size == 0:
        return False
    row = _read(db, "SELECT version_num FROM alembic_version")
    return row is not None and row[0] == _schema_head()


def _holds_runs(db: Path) -> bool:
    """Whether an incomplete store holds runs: then it is not dcluster's to move (an older
    schema wants ``mlflow db upgrade``, which only its owner should decide on)."""
    runs = _read(db, "SELECT count(*) FROM runs")
    return runs is not None and runs[0] > 0


def _move_aside(db: Path) -> None:
    """Set an empty half-built store aside (MLflow can neither use nor finish it)."""
    aside = db.with_name(f"{db.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
    log.warning("the MLflow store %s is half-built and holds no runs (a creation was "
                "interrupted): moved aside to %s and created again", db, aside)
    db.rename(aside)


def _build(tmp: Path, artifact_root: str) -> None:
    """Create and fully migrate a store in ``tmp`` with MLflow's own code, then close it, so
    that no journal or connection refers to the temp name after the rename."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    uri = f"{SQLITE_PREFIX}{tmp}"
    store = SqlAlchemyStore(uri, artifact_root)
    store.engine.dispose()
    SqlAlchemyStore._engine_map.pop(uri, None)  # pylint: disable=protected-access


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive lock between the processes creating one store; the kernel drops it when
    its holder dies, so a killed creator never blocks the next one."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def tracking_uri(cfg: Config) -> str:
    """cfg.tracking.uri, or an absolute SQLite URI under runs_root (absolute, so that a job
    started from another working directory finds the same store)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    return f"sqlite:///{(Path(cfg.runs_root) / 'mlflow.db').resolve()}"

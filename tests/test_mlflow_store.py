"""The SQLite MLflow store under runs_root: a kill -9 in the middle of its creation, a
half-built store left by an older dcluster, and several runs creating it at once, each with
real processes, real migrations and a real store."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

from dcluster.reporting.mlflow_store import ensure_store

REPO = Path(__file__).resolve().parent.parent

# Run MLflow's schema migrations half-way, then SIGKILL the process: ``creator`` is either
# dcluster's ensure_store or MLflow's own in-place creation (what older dcluster did).
KILLED_MID_MIGRATION = """
import os, signal, sys
from alembic import command
from alembic.script import ScriptDirectory
upgrade = command.upgrade
def upgrade_half_way_and_die(config, revision, **kwargs):
    revisions = [r.revision for r in ScriptDirectory.from_config(config).walk_revisions()]
    upgrade(config, revisions[len(revisions) // 2], **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
command.upgrade = upgrade_half_way_and_die
db, creator = sys.argv[1], sys.argv[2]
if creator == "dcluster":
    from pathlib import Path
    from dcluster.reporting.mlflow_store import ensure_store
    ensure_store(Path(db), "file:///tmp/artifacts")
else:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    SqlAlchemyStore("sqlite:///" + db, "file:///tmp/artifacts")
"""

# Three `dcluster train`-like starts on one fresh runs root: the tracker of each.
START_TRACKER = """
import sys
from dcluster.methods import Config
from dcluster.reporting.mlflow_run import Tracker
from dcluster.core.rundir import prepare_run_dir
cfg = Config(name=sys.argv[2], runs_root=sys.argv[1])
cfg.data.path = sys.argv[1]
tracker = Tracker()
tracker.start(cfg, prepare_run_dir(cfg))
tracker.finish()
"""


def kill_mid_migration(db: Path, creator: str) -> None:
    done = subprocess.run([sys.executable, "-c", KILLED_MID_MIGRATION, str(db), creator],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-3000:]


def assert_usable(db: Path) -> None:
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.create_experiment(f"probe-{len(client.search_experiments())}")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "loss", 1.0, step=1)
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [1.0]


def test_a_kill_during_the_stores_creation_leaves_no_store_and_the_next_start_builds_it(
        tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    kill_mid_migration(db, "dcluster")
    assert not db.exists()  # the half-migrated database is only a temp file beside it
    assert list(tmp_path.glob(".mlflow.db.*.tmp"))
    ensure_store(db, (tmp_path / "mlartifacts").as_uri())
    assert not list(tmp_path.glob(".mlflow.db.*.tmp"))  # the killed creator's temp is gone
    assert_usable(db)


def test_an_empty_half_built_store_is_moved_aside_and_built_again(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    kill_mid_migration(db, "mlflow")  # MLflow's in-place creation: the broken store exists
    assert db.exists()
    ensure_store(db, (tmp_path / "mlartifacts").as_uri())
    [aside] = tmp_path.glob("mlflow.db.incomplete-*")
    assert aside.stat().st_size > 0
    assert_usable(db)


def test_a_store_that_holds_runs_is_never_touched(tmp_path: Path) -> None:
    """Even at a schema this MLflow does not expect (an older MLflow's store): upgrading it is
    its owner's decision, and MLflow's own error says how."""
    db = tmp_path / "mlflow.db"
    ensure_store(db, (tmp_path / "mlartifacts").as_uri())
    assert_usable(db)
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE alembic_version SET version_num = 'older'")
    before = db.read_bytes()
    ensure_store(db, (tmp_path / "mlartifacts").as_uri())
    assert db.read_bytes() == before and not list(tmp_path.glob("mlflow.db.incomplete-*"))


def test_three_runs_starting_together_on_a_fresh_runs_root_share_one_store(
        tmp_path: Path) -> None:
    names = ("sweep0", "sweep1", "sweep2")
    starts = [subprocess.Popen([sys.executable, "-c", START_TRACKER, str(tmp_path), name],
                               cwd=REPO, stderr=subprocess.PIPE, text=True) for name in names]
    try:
        errors = [proc.communicate(timeout=300)[1] for proc in starts]
    finally:
        for proc in starts:
            proc.kill()
    assert [proc.returncode for proc in starts] == [0, 0, 0], errors
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [experiment] = [e for e in client.search_experiments() if e.name == "dcluster"]
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == list(names)
    assert all(r.info.status == "FINISHED" for r in runs)

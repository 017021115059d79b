"""A real single-host Slurm cluster for the tests marked `slurm`, as a pytest plugin.

Registered from conftest.py with ``pytest_plugins = ["slurm_cluster"]``. The session fixture
`slurm_cluster` starts the cluster with slurm/local/start.sh (installing Slurm and munge with
apt-get on first use) and stops it with slurm/local/stop.sh when the session ends, whatever
the outcome of the tests. A cluster that was already up before the session (started by hand
or by CI) is reused and left running: only what the session started is stopped.

Tests that need the cluster are skipped, with the reason and the daemons' log tails, when
it cannot be had: not root, no apt-get to install Slurm, or daemons that do not start.
DCLUSTER_REQUIRE_SLURM=1 (set by .ci/run) makes those cases failures instead of skips
(tests/required.py).
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NoReturn, TypeVar

import pytest

from required import unavailable

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
START = REPO / "slurm" / "local" / "start.sh"
STOP = REPO / "slurm" / "local" / "stop.sh"
STATE_DIR = Path(os.environ.get("DCLUSTER_SLURM_DIR", "/tmp/dcluster-slurm"))
# The first start installs slurm-wlm and munge: allow for apt-get on a slow mirror.
START_TIMEOUT_S = 600
STOP_TIMEOUT_S = 120
LOG_TAIL_LINES = 30
START_MESSAGE_LINES = 30

# A requeued job launched at once can be refused by slurmd ("Job credential revoked": it still
# holds the revocation of the requeue) and then fails for good; the cluster's credentials
# expire after 10 s (slurm/local/start.sh), so a released job starts after that.
REQUEUED_START = "now+15"

T = TypeVar("T")


@dataclass(frozen=True)
class SlurmCluster:
    """A running cluster: where its config is, and helpers to observe jobs on it.

    The session fixture also puts SLURM_CONF into os.environ, because submitit (and the
    launcher) run sbatch, scancel and scontrol with the process environment.
    """

    state_dir: Path
    conf: Path

    @property
    def env(self) -> dict[str, str]:
        """The variables that point Slurm's commands at this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def command(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Runs a Slurm client command against this cluster, without raising on failure."""
        return subprocess.run(list(args), env={**os.environ, **self.env}, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def squeue_states(self, job_id: str) -> list[str]:
        """The states squeue reports for a job (one per array element), [] once it is gone.

        Without an accounting store sacct fails and submitit's states read UNKNOWN, so squeue
        is the only view of a job; slurmctld keeps finished jobs for MinJobAge (300 s).
        """
        # --states=all: without it squeue hides finished jobs even when asked for one by id.
        out = self.command("squeue", "-h", "--states=all", "-j", str(job_id), "-o", "%T")
        return out.stdout.split() if out.returncode == 0 else []

    def wait_for(self, predicate: Callable[[], T], timeout: float, what: str,
                 interval: float = 0.5) -> T:
        """Polls `predicate` until it returns something truthy and returns that value.

        Raises TimeoutError naming `what`, with squeue and the daemons' log tails, when it
        stays falsy for `timeout` seconds: a test waits on an observable outcome, never on a
        fixed sleep.
        """
        start = time.monotonic()
        deadline = start + timeout
        while True:
            value = predicate()
            if value:
                log.info("%s after %.1f s", what, time.monotonic() - start)
                return value
            if time.monotonic() >= deadline:
                queue = self.command("squeue", "-o", "%i %T %r %S %j").stdout
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                                   f"squeue:\n{queue}\n{self.log_tails()}")
            time.sleep(interval)

    def release_requeued(self, job_id: str) -> None:
        """Waits for a requeued job to be back in the queue, then shortens the start delay
        Slurm gives it (about 45 s here) to REQUEUED_START."""
        def release() -> bool:
            if self.squeue_states(job_id) != ["PENDING"]:
                return False
            return self.command("scontrol", "update", f"JobId={job_id}",
                                f"StartTime={REQUEUED_START}").returncode == 0

        self.wait_for(release, timeout=90, what=f"job {job_id} to be requeued and released")

    def log_tails(self) -> str:
        """The last lines of the daemons' logs, to explain a failure."""
        return log_tails(self.state_dir)


def pytest_configure(config: pytest.Config) -> None:
    """Registers the `slurm` marker here, next to the fixture, so `-m "not slurm"` works."""
    config.addinivalue_line("markers", "slurm: needs the local Slurm cluster (root on Debian)")


def log_tails(state_dir: Path) -> str:
    """The last lines of slurmctld's, slurmd's and munged's logs under `state_dir`."""
    parts = []
    for path in (state_dir / "log" / "slurmctld.log", state_dir / "log" / "slurmd.log",
                 state_dir / "munge" / "munged.log"):
        try:
            tail = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError as e:
            tail = [f"(unreadable: {e})"]
        parts.append(f"--- {path}\n" + "\n".join(tail))
    return "\n".join(parts)


def _unavailable(reason: str) -> NoReturn:
    """Skips the tests that need the cluster, or fails them where the cluster is required."""
    unavailable("slurm", f"no local Slurm cluster: {reason}")


def _is_up(conf: Path) -> bool:
    """Whether a controller already answers with this config (the session did not start it)."""
    if not conf.exists() or shutil.which("scontrol") is None:
        return False
    ping = subprocess.run(["scontrol", "ping"], env={**os.environ, "SLURM_CONF": str(conf)},
                          capture_output=True, text=True, timeout=30, check=False)
    return ping.returncode == 0 and "UP" in ping.stdout


def _stop(state_dir: Path) -> None:
    """Runs stop.sh; a failure is logged, not raised, so it never masks the tests' outcome."""
    try:
        out = subprocess.run([str(STOP), str(state_dir)], capture_output=True, text=True,
                             timeout=STOP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        log.error("stop.sh did not finish within %d s", STOP_TIMEOUT_S)
        return
    level = logging.INFO if out.returncode == 0 else logging.ERROR
    log.log(level, "stop.sh exited %d:\n%s", out.returncode, out.stderr)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Starts the local cluster once per session and stops it at the end if it started it."""
    if os.geteuid() != 0:
        _unavailable("needs root to run slurmd and munged")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        _unavailable("Slurm is not installed and apt-get is not available to install it")

    conf = STATE_DIR / "slurm.conf"
    was_up = _is_up(conf)
    started = time.monotonic()
    failure = ""
    try:
        out = subprocess.run([str(START), str(STATE_DIR)], capture_output=True, text=True,
                             timeout=START_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        failure = f"start.sh did not finish within {START_TIMEOUT_S} s"
    else:
        if out.returncode:
            # Its own messages and the error, without the log tails it prints (added below,
            # also for a timeout) and without most of apt-get's output.
            messages = out.stderr.split("--- tail of", 1)[0].splitlines()
            failure = f"start.sh exited {out.returncode}:\n" + "\n".join(
                messages[-START_MESSAGE_LINES:])
    if failure:
        if not was_up:
            _stop(STATE_DIR)  # end whatever part of the cluster did come up
        _unavailable(f"{failure}\n{log_tails(STATE_DIR)}")
    log.info("Slurm cluster %s in %.1f s (%s)", "reused" if was_up else "started",
             time.monotonic() - started, conf)

    cluster = SlurmCluster(state_dir=STATE_DIR, conf=conf)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in cluster.env.items():
            mp.setenv(name, value)
        try:
            yield cluster
        finally:
            if was_up:
                log.info("leaving the Slurm cluster running: it was up before this session")
            else:
                _stop(STATE_DIR)

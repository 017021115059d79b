"""ImageNet's size rehearsed on this CPU: the real CLI (`dcluster train` and `dcluster eval` under
torchrun, 2 gloo ranks, one thread each) with configs/rehearsal_imagenet.yaml on the synthetic
set (`dcluster demo-data --dataset synthetic`) at three sizes, each stage timed and each rank's
peak resident memory sampled, then fitted against N.

What it runs, per N (the data set written first if missing):
- N0 = 20,000 (the baseline: a rank's fixed model/runtime memory, where its own rows are a few
  MB): 1 epoch, `eval knn`, `eval clusters`.
- the smallest N: 2 epochs uninterrupted, and the same run SIGTERMed inside epoch 2's training
  pass and resumed: the two final checkpoints' weights must be ``torch.equal``; the same 2 epochs
  with the feature bank on (clustering.features=training_pass); `eval knn` and `eval clusters`.
- the middle N: 1 epoch, the two evals.
- the largest N (ImageNet's 1,281,167): 2 epochs SIGTERMed inside epoch 2's training pass and
  resumed, the two evals.

Per stage, seconds from the runs' histories (features, clustering, of it k-means alone,
training, monitor: epoch 1, the same work at every N) and the evals' JSON; per invocation,
every rank's peak RSS (VmHWM of /proc/<pid>/status, sampled every 0.2 s; VmHWM only grows, so
the last sample before a rank exits is its peak). The JSON line, last:
- ``exponents``: slope of log(seconds) against log(N) per stage over the three N, and of
  log(peak - baseline peak) per invocation kind (largest over ranks): linear growth is 1.0.
- ``max_rank_peak_over_own_shard``: per invocation kind at the largest N, the largest over
  ranks of peak / (own N/2 rows x 64 float32 features + that rank's baseline peak).
- ``stage_over_bare_kmeans``: the clustering stage over k-means alone on the same reduced
  vectors (time_clustering / time_kmeans) at the largest N, epoch 1.
- ``resume_equal``: the stop/resume check at the smallest N.
Everything it has done is kept in OUT/state.json: rerun the same command after an interruption
and it goes on from the first step not done. Run it on a quiet machine: the times are the
point. Usage: python benchmarks/rehearse_imagenet.py --data-root DIR --out DIR
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "rehearsal_imagenet.yaml"
WORLD = 2
FEATURE_DIM = 64  # model.fc_dim of the preset: the widest rows a rank holds
BASELINE_N = 20_000
SIZES = (80_000, 320_000, 1_281_167)
STAGES = ("time_features", "time_clustering", "time_kmeans", "time_training", "time_monitor")
SAMPLE_S = 0.2


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def status_kib(pid: int, field: str) -> Optional[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rank_of(pid: int) -> Optional[int]:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


class Launch:
    """One `torchrun -m dcluster.cli ARGS` job: its output in a log file, each rank's peak
    RSS sampled while it runs, and an optional SIGTERM to the ranks once the log shows epoch
    2's training pass at 10% or more (as Slurm signals every task of a job)."""

    def __init__(self, args: list[str], log: Path, stop_in_epoch2: bool = False) -> None:
        self.args, self.log, self.stop_in_epoch2 = args, log, stop_in_epoch2
        self.peaks: dict[int, int] = {}  # rank -> VmHWM KiB
        self.signalled = False

    def run(self) -> dict[str, Any]:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}",
                   "--master-port", str(29500 + os.getpid() % 1000), "-m", "dcluster.cli",
                   *self.args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        started = time.perf_counter()
        with open(self.log, "wb") as out:
            proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out,
                                    stderr=subprocess.STDOUT)
            try:
                while proc.poll() is None:
                    self._sample(proc.pid)
                    if self.stop_in_epoch2 and not self.signalled and self._in_epoch2_training():
                        for pid in children(proc.pid):
                            if rank_of(pid) is not None:
                                os.kill(pid, signal.SIGTERM)
                        self.signalled = True
                    time.sleep(SAMPLE_S)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        return {"args": self.args, "returncode": proc.returncode,
                "seconds": round(time.perf_counter() - started, 1),
                "peak_rss_gb": {str(r): round(kib / 2**20, 3) for r, kib in sorted(self.peaks.items())},
                "signalled": self.signalled}

    def _sample(self, pid: int) -> None:
        for child in children(pid):
            rank, peak = rank_of(child), status_kib(child, "VmHWM")
            if rank is not None and peak is not None:
                self.peaks[rank] = max(self.peaks.get(rank, 0), peak)

    def _in_epoch2_training(self) -> bool:
        text = self.log.read_bytes().decode(errors="replace")
        first = text.find("epoch 1/2 |")
        return first >= 0 and re.search(r"train:\s+[1-9]\d%", text[first:]) is not None


class Rehearsal:
    def __init__(self, data_root: Path, out: Path, sizes: tuple[int, ...]) -> None:
        self.data_root, self.out, self.sizes = data_root, out, sizes
        out.mkdir(parents=True, exist_ok=True)
        self.state_path = out / "state.json"
        self.state: dict[str, Any] = (json.loads(self.state_path.read_text())
                                      if self.state_path.exists() else {})

    def step(self, name: str, work) -> Any:
        """``work()``'s result, computed once: kept in state.json for a rerun."""
        if name not in self.state:
            print(f"[rehearsal] {name} ...", flush=True)
            self.state[name] = work()
            self.state_path.write_text(json.dumps(self.state, indent=1))
            print(f"[rehearsal] {name}: {json.dumps(self.state[name])[:300]}", flush=True)
        return self.state[name]

    def data(self, n: int) -> Path:
        path = self.data_root / f"synthetic_{n}"

        def write() -> dict[str, Any]:
            subprocess.run([sys.executable, "-m", "dcluster.cli", "demo-data", str(path),
                            "--dataset", "synthetic", "--n", str(n)], cwd=REPO, check=True)
            manifest = json.loads((path / "manifest.json").read_text())
            return {"bytes": manifest["bytes"], "write_seconds": manifest["write_seconds"]}

        self.step(f"data/{n}", write)
        return path

    def train(self, n: int, name: str, epochs: int, *extra: str, stop: bool = False
              ) -> dict[str, Any]:
        args = ["train", str(CONFIG), f"data.path={self.data(n)}", f"runs_root={self.out}",
                f"name={name}", f"epochs={epochs}", *extra]
        if stop:
            args.append("progress=always")  # the bar on stderr marks the training pass
        key = f"train/{name}" + ("/stopped" if stop else "")
        first = self.step(key, lambda: self._checked(Launch(args, self.out / f"{name}.log",
                                                           stop).run(), allow_stop=stop))
        if stop:
            self.step(f"train/{name}/resumed",
                      lambda: self._checked(Launch(args, self.out / f"{name}.resumed.log").run()))
        return first

    def evaluate(self, protocol: str, name: str) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            outcome = self._checked(Launch(["eval", protocol, str(self.out / name)],
                                           self.out / f"{name}.eval_{protocol}.log").run())
            newest = max((self.out / name / "eval").glob(f"{protocol}_e*.json"),
                         key=lambda p: p.stat().st_mtime)
            outcome["result"] = json.loads(newest.read_text())
            return outcome

        return self.step(f"eval/{protocol}/{name}", run)

    @staticmethod
    def _checked(outcome: dict[str, Any], allow_stop: bool = False) -> dict[str, Any]:
        if outcome["returncode"] != 0 and not (allow_stop and outcome["signalled"]):
            raise SystemExit(f"failed: {outcome}")
        if allow_stop and not outcome["signalled"]:
            raise SystemExit(f"the run ended before epoch 2's training pass was seen: {outcome}")
        return outcome

    def history(self, name: str) -> list[dict[str, float]]:
        sys.path.insert(0, str(REPO))
        from dcluster.runtime.checkpoint import load_latest

        payload, _ = load_latest(self.out / name / "checkpoints")
        return payload["history"]

    def weights(self, name: str) -> dict[str, Any]:
        from dcluster.runtime.checkpoint import load_latest

        payload, _ = load_latest(self.out / name / "checkpoints")
        return payload["model"]


def slope(ns: list[int], values: list[float]) -> Optional[float]:
    """The exponent b of values ~ N^b, least squares in log-log; None if a value is not > 0."""
    if len(ns) < 2 or any(v <= 0 for v in values):
        return None
    b = np.polyfit(np.log(ns), np.log(values), 1)[0]
    return round(float(b), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs=3, default=SIZES)
    args = parser.parse_args()
    sizes = tuple(sorted(args.sizes))
    r = Rehearsal(args.data_root, args.out, sizes)
    started = time.perf_counter()
    small, middle, large = sizes

    kinds = ("train", "eval_knn", "eval_clusters")
    peaks: dict[int, dict[str, dict[str, float]]] = {}
    for n, name, epochs, stop in ((BASELINE_N, "n20000", 1, False),
                                  (small, f"n{small}_stopped", 2, True),
                                  (middle, f"n{middle}", 1, False),
                                  (large, f"n{large}", 2, True)):
        trained = r.train(n, name, epochs, stop=stop)
        knn, clusters = r.evaluate("knn", name), r.evaluate("clusters", name)
        peaks[n] = {"train": trained["peak_rss_gb"], "eval_knn": knn["peak_rss_gb"],
                    "eval_clusters": clusters["peak_rss_gb"]}
        if stop:  # the resumed half of the run is the same kind of process
            resumed = r.state[f"train/{name}/resumed"]["peak_rss_gb"]
            peaks[n]["train"] = {k: max(v, resumed.get(k, 0.0)) for k, v in trained["peak_rss_gb"].items()}
    r.train(small, f"n{small}_full", 2)
    r.train(small, f"n{small}_bank", 2, "clustering.features=training_pass")
    import torch

    full, resumed = r.weights(f"n{small}_full"), r.weights(f"n{small}_stopped")
    resume_equal = all(torch.equal(full[k], resumed[k]) for k in full) and full.keys() == resumed.keys()

    names = {BASELINE_N: "n20000", small: f"n{small}_stopped", middle: f"n{middle}",
             large: f"n{large}"}
    seconds: dict[str, dict[str, float]] = {}
    for n in sizes:
        epoch1 = r.history(names[n])[0]
        seconds[str(n)] = {stage[5:]: round(epoch1[stage], 1) for stage in STAGES if stage in epoch1}
        for protocol in ("knn", "clusters"):
            seconds[str(n)][f"eval_{protocol}"] = r.state[f"eval/{protocol}/{names[n]}"]["result"]["seconds"]
    stages = list(seconds[str(large)])
    exponents = {stage: slope(list(sizes), [seconds[str(n)][stage] for n in sizes]) for stage in stages}
    for kind in kinds:
        base = peaks[BASELINE_N][kind]
        grown = [max(peaks[n][kind][rank] - base[rank] for rank in base) for n in sizes]
        exponents[f"peak_{kind}"] = slope(list(sizes), grown)
    own = math.ceil(large / WORLD) * FEATURE_DIM * 4 / 2**30
    over_own = {kind: round(max(peaks[large][kind][rank] / (own + peaks[BASELINE_N][kind][rank])
                                for rank in peaks[large][kind]), 3) for kind in kinds}
    epoch1 = r.history(names[large])[0]
    final = r.history(names[large])[-1]
    result = {
        "sizes": list(sizes), "world": WORLD, "seconds": seconds, "exponents": exponents,
        "peak_rss_gb": {str(n): p for n, p in peaks.items()},
        "max_rank_peak_over_own_shard": over_own,
        "stage_over_bare_kmeans": round(epoch1["time_clustering"] / epoch1["time_kmeans"], 3),
        "resume_equal": resume_equal,
        "full_n_wall_s": round(sum(r.state[key]["seconds"] for key in r.state
                                   if key.endswith(f"/n{large}") or f"/n{large}/" in key), 1),
        "full_n_monitor": {k: round(v, 4) for k, v in final.items() if k.startswith("monitor_")},
        "full_n_eval": {p: r.state[f"eval/{p}/n{large}"]["result"]["metrics"] for p in ("knn", "clusters")},
        "bank_on": {k[5:]: round(v, 1) for k, v in r.history(f"n{small}_bank")[0].items() if k in STAGES},
        "data": {k[5:]: v for k, v in r.state.items() if k.startswith("data/")},
        "this_call_s": round(time.perf_counter() - started, 1),
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    (args.out / "tables.md").write_text(markdown_tables(result))
    print(json.dumps(result))


def markdown_tables(result: dict[str, Any]) -> str:
    """The measured tables of docs/scale.md: seconds per stage at each N with the fitted
    exponent, and each rank's peak per kind of process."""
    sizes = [str(n) for n in result["sizes"]]
    stages = list(result["seconds"][sizes[-1]])
    lines = ["| stage | " + " | ".join(f"N = {int(n):,}" for n in sizes) + " | exponent |",
             "|---" * (len(sizes) + 2) + "|"]
    for stage in stages:
        lines.append(f"| {stage} | " + " | ".join(f"{result['seconds'][n][stage]:.1f} s"
                                               for n in sizes)
                     + f" | {result['exponents'][stage]} |")
    lines += ["", "| process | " + " | ".join(f"N = {int(n):,}" for n in
                                              [str(BASELINE_N), *sizes]) + " | exponent |",
              "|---" * (len(sizes) + 3) + "|"]
    for kind in ("train", "eval_knn", "eval_clusters"):
        cells = [" / ".join(f"{gb:.2f}" for gb in result["peak_rss_gb"][n][kind].values())
                 for n in [str(BASELINE_N), *sizes]]
        lines.append(f"| {kind} | " + " | ".join(f"{c} GB" for c in cells)
                     + f" | {result['exponents'][f'peak_{kind}']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

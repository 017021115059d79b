"""One command that checks dcluster on a machine with a GPU (about 6-8 minutes on one GPU and
16 cores), measuring what the CPU machines cannot:

1. ``dcluster info``: versions, devices, the code paths a run would take;
2. AlexNet-BN at 224 px, batch 256, channels_last, fp32 vs bf16, DALI decoding on the GPU
   (nvJPEG) vs on the CPU: the training pass's and the feature pass's images/s through
   dcluster's own loops, and the DALI pipeline's rate alone (the training pass's goal: at least
   90% of it); VGG16-BN training fp32 vs bf16 (the goal: bf16 at least 1.5x);
3. the clustering stage on the GPU against bare FAISS GPU k-means on the same vectors
   (``benchmarks/bench_clustering.py --device cuda``, N=200k x 4096, k=10,000; goal 1.10x);
4. a 2-epoch ``dcluster train`` on the GPU, killed with SIGKILL after its first mid-epoch
   checkpoint and run again: it must resume and finish; the same with the feature bank
   (``clustering.features=training_pass``, float16 rows in GPU memory);
5. the code paths that ran, from the logs.

It writes a few thousand ImageNet-sized JPEGs to a temporary folder first. Without a GPU it
says so and exits 0 without measuring anything. The last line of output is one JSON object.

    .venv/bin/python benchmarks/gpu_check.py [--images 3000] [--workers 16] [--quick]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

# what the logs say when a code path runs (dcluster's own log lines)
PATH_MARKERS = {
    "nvjpeg_decoding": "DALI: decoding with nvJPEG",
    "cpu_decoding": "DALI: decoding and augmenting on the CPU",
    "gpu_backends": "TF32",
    "passes": "passes on cuda",
    "stop_poll": "stop and checkpoint agreement every",
    "resumed": "resuming from",
    "feature_bank_on_gpu": "in a feature bank (float16, cuda",
}


def no_gpu() -> int:
    print("gpu_check: no CUDA GPU is visible to torch on this machine (torch "
          f"{torch.__version__}, CUDA build {torch.version.cuda}): nothing was measured. Run it "
          "on a machine with a GPU.")
    print(json.dumps({"gpu": False, "measured": False}))
    return 0


def write_one(args: tuple[Path, int, int]) -> None:
    from bench_loader import write_photos_range

    write_photos_range(*args)


def make_images(root: Path, count: int, workers: int) -> float:
    """``count`` ImageNet-sized JPEGs in 10 class folders, written by ``workers`` processes."""
    start = time.perf_counter()
    step = max(1, count // workers)
    ranges = [(root, first, min(first + step, count)) for first in range(0, count, step)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(write_one, ranges))
    return time.perf_counter() - start


def run_command(command: list[str], timeout: float, log: Path) -> dict[str, Any]:
    """A subprocess, its output to ``log``; rc, seconds and the JSON of its last line."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        output, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:
        output = f"{err.stdout or ''}{err.stderr or ''}"
        output = output.decode() if isinstance(output, bytes) else output
        rc = "timeout"
    log.write_text(output)
    result: dict[str, Any] = {"rc": rc, "seconds": round(time.perf_counter() - start, 1)}
    lines = [line for line in (done.stdout if rc != "timeout" else "").splitlines() if line]
    if lines:
        try:
            result["json"] = json.loads(lines[-1])
        except json.JSONDecodeError:
            result["tail"] = lines[-1][-300:]
    if rc != 0:
        result["error_tail"] = output[-1200:]
    return result


def timed_rate(images: int, run: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def pass_rates(data: Path, decode: str, workers: int, arch: str, batch: int,
               precisions: tuple[str, ...], features: bool) -> dict[str, float]:
    """Images/s of the DALI training pipeline alone and of dcluster's training (and feature)
    passes on it, per precision, after one warm-up pass each."""
    from dcluster.collectives import Comm
    from dcluster.config import CheckpointConfig, DataConfig, ModelConfig, OptimConfig
    from dcluster.data import build_pipelines, open_source
    from dcluster.distributed import Env
    from dcluster.execution import Execution, enable_gpu_backends
    from dcluster.extract import extract_features
    from dcluster.models import build_model
    from dcluster.optimize import EpochProgress, StepLoop, body_optimizer, sgd, train_one_epoch
    from dcluster.stop import StopPoints, StopRequest

    device = torch.device("cuda", 0)
    enable_gpu_backends(device)
    cfg = DataConfig(path=str(data), decode_device=decode, workers=workers)
    source = open_source(cfg)
    pipelines = build_pipelines(source, cfg, seed=0)
    order = np.arange(len(source))
    labels = (order % 1000).astype(np.int64)
    out: dict[str, float] = {}

    def pipeline_alone() -> None:
        for b in pipelines.train_batches(order, labels, 0, batch):
            b.images.to(device, non_blocking=True)

    pipeline_alone()
    out["dali_pipeline_img_s"] = timed_rate(len(order), pipeline_alone)
    env = Env(0, 1, 0, device)
    comm = Comm(env)
    for precision in precisions:
        execution = Execution(device, precision, channels_last=True)
        torch.manual_seed(0)
        model = execution.prepare(build_model(ModelConfig(arch=arch), 224))
        head = model.reset_head(1000, torch.Generator().manual_seed(0))
        optim = OptimConfig(batch_size=batch)
        optimizers = [body_optimizer(model, optim, 0.01, device), sgd(head.parameters(), optim,
                                                                      0.01, device)]
        steps = StepLoop(device, "never", False,
                         StopPoints(StopRequest(), CheckpointConfig(), comm, device), execution)

        def train() -> None:
            train_one_epoch(model, pipelines, order, labels, 0, batch, optimizers, steps,
                            EpochProgress())

        train()
        torch.cuda.reset_peak_memory_stats(device)
        steps.data_wait_s = 0.0
        rate = out[f"train_{precision}_img_s"] = timed_rate(len(order), train)
        # the share of the timed pass the step loop waited for its batches
        out[f"train_{precision}_data_wait"] = steps.data_wait_s * rate / len(order)
        out[f"train_{precision}_gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        if features:
            def feature_pass() -> None:
                extract_features(model, pipelines, order, 2 * batch, device, "never", False,
                                 execution=execution)

            feature_pass()
            out[f"features_{precision}_img_s"] = timed_rate(len(order), feature_pass)
    return {key: round(value, 3) for key, value in out.items()}


def kill_and_resume(data: Path, runs: Path, logs: Path, timeout: float, name: str = "gpu_check",
                    extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """`dcluster train` for 2 epochs on the GPU, SIGKILLed once its first mid-epoch checkpoint
    of epoch 1 is on disk, then run again to the end (with ``extra`` overrides)."""
    args = [sys.executable, "-m", "dcluster", "train", "configs/demo.yaml", f"name={name}",
            f"data.path={data}", f"runs_root={runs}", "epochs=2", "model.arch=alexnet",
            "model.fc_dim=4096", "model.fc_init=paper", "data.crop_size=224",
            "data.resize_size=256", "data.workers=8", "optim.batch_size=256", "clustering.k=100",
            "clustering.pca_dim=256", "checkpoint.every_iterations=4", "optim.precision=bf16",
            "progress=never", "threads=8", "eval.class_kmeans=false", *extra]
    checkpoints = runs / name / "checkpoints"
    start = time.perf_counter()
    with open(logs / f"{name}_killed.log", "w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        killed = False
        while proc.poll() is None and time.perf_counter() - start < timeout:
            if [p for p in checkpoints.glob("ckpt_e000001_i*.pt")
                    if not p.name.endswith("_i0000000.pt")]:  # inside epoch 1, not its start
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.2)
        if not killed and proc.poll() is None:  # no checkpoint in time: end it anyway
            proc.kill()
        proc.wait()
    result: dict[str, Any] = {"killed": killed,
                              "killed_after_s": round(time.perf_counter() - start, 1)}
    resumed = run_command(args, timeout, logs / f"{name}_resumed.log")
    text = (logs / f"{name}_resumed.log").read_text()
    result.update(resume_rc=resumed["rc"], resume_seconds=resumed["seconds"],
                  resumed_inside_epoch="inside epoch 1" in text,
                  finished=(checkpoints / "ckpt_e000002_i0000000.pt").is_file())
    epoch_lines = [line for line in text.splitlines() if re.search(r"epoch \d+/2 \|", line)]
    result["epoch_lines"] = [line.split(": ", 1)[-1][:400] for line in epoch_lines]
    return result


def code_paths(logs: Path) -> dict[str, bool]:
    text = "\n".join(p.read_text(errors="replace") for p in logs.glob("*.log"))
    return {name: marker in text for name, marker in PATH_MARKERS.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--quick", action="store_true",
                        help="smaller clustering (50k x 4096, k=1000) and no VGG16")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        return no_gpu()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = args.keep or Path(tempfile.mkdtemp(prefix="dcluster_gpu_check_"))
    data, logs = work / "images", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs / "passes.log")
    logging.getLogger("dcluster").addHandler(handler)
    report: dict[str, Any] = {"gpu": True, "device": torch.cuda.get_device_name(0),
                              "images": args.images, "workers": args.workers}
    report["images_written_s"] = round(make_images(data, args.images, args.workers), 1)
    report["info"] = run_command([sys.executable, "-m", "dcluster", "info"], 120,
                                 logs / "info.log")["rc"]
    print((logs / "info.log").read_text())
    sections: list[tuple[str, Callable[[], Any]]] = [
        ("alexnet_gpu_decode", lambda: pass_rates(data, "gpu", args.workers, "alexnet", 256,
                                                  ("fp32", "bf16"), True)),
        ("alexnet_cpu_decode", lambda: pass_rates(data, "cpu", args.workers, "alexnet", 256,
                                                  ("fp32", "bf16"), True)),
    ]
    if not args.quick:
        sections.append(("vgg16_gpu_decode", lambda: pass_rates(
            data, "gpu", args.workers, "vgg16", 64, ("fp32", "bf16"), False)))
    for name, measure in sections:
        try:
            report[name] = measure()
        except Exception as err:  # a section that fails must not hide the others' numbers
            report[name] = {"error": f"{type(err).__name__}: {err}"[:600]}
        print(name, json.dumps(report[name]), flush=True)
    n, k = (50_000, 1000) if args.quick else (200_000, 10_000)
    report["clustering"] = run_command(
        [sys.executable, "benchmarks/bench_clustering.py", "--device", "cuda", "--n", str(n),
         "--dim", "4096", "--k", str(k)], 240, logs / "clustering.log")
    print("clustering", json.dumps(report["clustering"])[:2000], flush=True)
    report["kill_resume"] = kill_and_resume(data, work / "runs", logs, 150)
    print("kill_resume", json.dumps(report["kill_resume"]), flush=True)
    # the feature bank on the GPU: float16 rows in GPU memory, written under bf16 autocast
    report["bank_kill_resume"] = kill_and_resume(
        data, work / "runs", logs, 150, "gpu_check_bank",
        ("clustering.features=training_pass", "clustering.bank.dtype=float16"))
    print("bank_kill_resume", json.dumps(report["bank_kill_resume"]), flush=True)
    report["code_paths"] = code_paths(logs)
    report["goals"] = goals(report)
    print(f"logs and images in {work}")
    print(json.dumps(report))
    return 0


def goals(report: dict[str, Any]) -> dict[str, Optional[float]]:
    """The issue's GPU goals, as measured ratios (None where a section failed)."""
    def ratio(section: str, top: str, bottom: str) -> Optional[float]:
        values = report.get(section, {})
        if top in values and bottom in values and values[bottom]:
            return round(values[top] / values[bottom], 3)
        return None

    clustering = report.get("clustering", {}).get("json", {})
    return {
        "train_bf16_over_dali_pipeline": ratio("alexnet_gpu_decode", "train_bf16_img_s",
                                               "dali_pipeline_img_s"),  # goal >= 0.90
        "vgg16_bf16_over_fp32": ratio("vgg16_gpu_decode", "train_bf16_img_s",
                                      "train_fp32_img_s"),  # goal >= 1.5
        "clustering_stage_over_bare_kmeans": clustering.get("stage_over_bare_kmeans"),  # <= 1.10
    }


if __name__ == "__main__":
    sys.exit(main())

"""dcluster on a GPU host, in one command that runs whatever the host has installed: a bare
PyTorch GPU node (torch + torchvision, plus the small wheels `make gpu-check-wheels`
gathers) runs all but the FAISS and DALI sections, which say "skipped: not installed".

Sections in this order, each with its own time budget; no section starts that could take the
check past 6 minutes (on one H100 with 16 cores):

1. ``info``: ``dcluster info`` (builds, profile, GPUs, the k-means / k-NN / PIC backends) and
   the NVIDIA driver;
2. ``cli_train``: ``dcluster train`` through the real CLI on the demo digits, 2 epochs, with
   ``clustering.backend=torch`` on the GPU (bf16 only where the GPU computes in it, Ampere
   on), SIGTERMed once a checkpoint inside epoch 2 exists, run again: it must say "inside
   epoch 2" and end with the weights of an uninterrupted run (bit for bit on the CPU; on a
   GPU, where cuDNN's kernels need not be deterministic, within 10 times the difference of
   two uninterrupted runs); ``cli_train[2_ranks]``: one epoch of it on 2 torchrun ranks
   (gloo, both on the GPU): DDP and the run's collectives;
3. ``kmeans[torch]``: the PyTorch k-means backend on separated blobs (each cluster from one
   blob, purity 0.99), and its assignment rate at 1M x 256, k = 10,000 (rows resident on the
   GPU and streamed from host memory: the same labels) as a share of the GPU's float32 GEMM
   rate at that shape;
4. ``train_pass[<arch>]`` and ``feature_pass[<arch>]`` for AlexNet-BN and ResNet-50 at 224 px:
   images/s of a training step (batch 256, with its peak memory) and of the clustering
   features (eval, no grad), fp32 and bf16 (bf16 only where supported; bf16's features must
   match fp32's within bf16 rounding);
5. ``pca_eigensolver``: PCA statistics and the top-256 eigenpairs of 4,096-d power-law features
   on the GPU against a float64 ``eigh`` reference on the CPU (no fallback, 0.999 of the
   variance in full float32);
6. ``kmeans[faiss]``, ``dali``: FAISS's GPU k-means and a DALI GPU-decoding epoch, where
   installed ("skipped: not installed" otherwise: a bare PyTorch host has neither);
7. ``bank_kill_resume``: a SIGKILL inside epoch 2 and a resume with
   ``clustering.features=training_pass`` (the feature bank, float16 rows in GPU memory);
8. ``code_paths``: what the runs' logs say ran.

A section's result is written to ``--out`` (JSON) as soon as it ends, so a crash or a kill
keeps what was measured; the same JSON is the last line printed. Exit 1 only when a section
found a wrong result or raised; skipped and over-budget sections exit 0. Without a GPU it
skips everything unless ``--quick``, which runs every section on the CPU at toy sizes (what
the CPU tests run).

    python benchmarks/gpu_check.py [--out gpu_check.json] [--quick] [--skip SECTION ...]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
# this checkout's dcluster, in this process as in the `python -m dcluster` runs (cwd=ROOT)
sys.path.insert(0, str(ROOT))
TOTAL_BUDGET_S = 360.0
DIGITS = ROOT / "gpu-check-wheels" / "digits"  # benchmarks/gpu_check_wheels.py writes it

# what the logs say when a code path runs (dcluster's own log lines)
PATH_MARKERS = {
    "kmeans_torch_on_gpu": "k-means backend: PyTorch on 1 GPU(s)",
    "gpu_backends": "TF32",
    "passes_on_cuda": "passes on cuda",
    "stop_poll": "stop and checkpoint agreement every",
    "resumed_inside_epoch": "inside epoch 2",
    "feature_bank_on_gpu": "in a feature bank (float16, cuda",
    "torchvision_loader": "torchvision",
}


class WrongResult(Exception):
    """A section ran and measured something that must not be: the check fails (exit 1)."""


class OverBudget(Exception):
    """A section ran past its time budget (SIGALRM): reported, not a failure."""


@dataclass(frozen=True)
class Sizes:
    """Full sizes for a GPU, toy sizes for ``--quick`` on the CPU."""
    batch: int
    steps: int
    crop: int
    pca_rows: int
    pca_in: int
    pca_out: int
    kmeans_rows: int
    kmeans_dim: int
    kmeans_k: int
    rate_rows: int  # the assignment-rate measurement: rows x dim, k centroids
    rate_dim: int
    rate_k: int
    images: int
    run_overrides: tuple[str, ...]


FULL = Sizes(batch=256, steps=10, crop=224, pca_rows=100_000, pca_in=4096, pca_out=256,
             kmeans_rows=200_000, kmeans_dim=256, kmeans_k=1000, rate_rows=1_000_000,
             rate_dim=256, rate_k=10_000, images=1024,
             run_overrides=("data.workers=8", "threads=8"))
QUICK = Sizes(batch=4, steps=1, crop=64, pca_rows=4000, pca_in=512, pca_out=32,
              kmeans_rows=3000, kmeans_dim=16, kmeans_k=40, rate_rows=20_000, rate_dim=32,
              rate_k=100, images=160,
              run_overrides=("model.width=8", "model.fc_dim=64", "data.workers=1",
                             "clustering.k=10", "clustering.pca_dim=16", "threads=1"))

# the networks of the passes' sections: the presets' (configs/deepcluster_*_imagenet.yaml)
ARCHS = {"alexnet": {"arch": "alexnet"},
         "resnet50": {"arch": "resnet50", "fc_dim": 0, "dropout": 0.0}}


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    work: Path
    installed: dict[str, bool]
    digits: Optional[Path] = None  # a folder of demo digits brought along (--digits)


def installed_parts() -> dict[str, bool]:
    """What this host has: a CUDA GPU, FAISS (and whether it is a GPU build), DALI,
    torchvision (found without importing the heavy ones)."""
    faiss_gpu = False
    if importlib.util.find_spec("faiss") is not None:
        from dcluster.core.faiss_after_torch import faiss

        faiss_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    return {"cuda": torch.cuda.is_available(),
            "faiss": importlib.util.find_spec("faiss") is not None, "faiss_gpu": faiss_gpu,
            "dali": importlib.util.find_spec("nvidia") is not None
            and importlib.util.find_spec("nvidia.dali") is not None,
            "torchvision": importlib.util.find_spec("torchvision") is not None}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_of(device: torch.device, run: Callable[[], Any]) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


# --- model sections ---------------------------------------------------------------------------

def bf16_supported(device: torch.device) -> bool:
    """Whether the passes run bf16 here: on a GPU only from Ampere on, as runs allow
    (dcluster/parallel/execution.py refuses it before: torch would emulate it)."""
    from dcluster.parallel.execution import BF16_FROM

    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= BF16_FROM


def precisions(device: torch.device) -> tuple[str, ...]:
    return ("fp32", "bf16") if bf16_supported(device) else ("fp32",)


def network(ctx: Context, arch: str, precision: str):
    """``arch`` (as its ImageNet preset builds it) with a 1000-way head, prepared as a run
    would be (with the backend flags a run sets on this GPU: TF32, cuDNN's autotuner)."""
    from dcluster.core.config import ModelConfig
    from dcluster.parallel.execution import Execution, enable_gpu_backends
    from dcluster.models import build_model

    if ctx.device.type == "cuda":
        enable_gpu_backends(ctx.device)
    execution = Execution(ctx.device, precision, channels_last=ctx.device.type == "cuda")
    torch.manual_seed(0)
    model = execution.prepare(build_model(ModelConfig(**ARCHS[arch]), ctx.sizes.crop))
    model.reset_head(1000, torch.Generator().manual_seed(0))
    return execution, execution.prepare(model)


def train_pass(arch: str) -> Callable[[Context], dict[str, Any]]:
    """Training steps of ``arch``: images/s and peak memory per precision; finite losses."""
    def run(ctx: Context) -> dict[str, Any]:
        from dcluster.core.config import OptimConfig
        from dcluster.runtime.optimize import sgd

        out: dict[str, Any] = {"batch": ctx.sizes.batch, "crop": ctx.sizes.crop}
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(ctx.sizes.batch, 3, ctx.sizes.crop, ctx.sizes.crop, generator=gen)
        labels = torch.randint(0, 1000, (ctx.sizes.batch,), generator=gen).to(ctx.device)
        for precision in precisions(ctx.device):
            execution, model = network(ctx, arch, precision)
            optimizer = sgd(model.parameters(), OptimConfig(), 0.01, ctx.device)
            batch = execution.images(images)
            losses = []

            def step() -> None:
                with execution.autocast():
                    loss = torch.nn.functional.cross_entropy(model(batch), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())

            step()  # warm-up: cuDNN's autotuner, allocations
            if ctx.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(ctx.device)
            seconds = seconds_of(ctx.device, lambda: [step() for _ in range(ctx.sizes.steps)])
            if not all(math.isfinite(float(loss)) for loss in losses):
                raise WrongResult(f"{precision}: non-finite loss {[float(v) for v in losses]}")
            out[f"{precision}_img_s"] = round(ctx.sizes.steps * ctx.sizes.batch / seconds, 1)
            if ctx.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(ctx.device)
                out[f"{precision}_peak_gb"] = round(peak / 2**30, 2)
            del model, optimizer, batch
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
        out["channels_last"] = ctx.device.type == "cuda"
        return out
    return run


def feature_pass(arch: str) -> Callable[[Context], dict[str, Any]]:
    """The clustering features of ``arch``: images/s per precision; bf16's close to fp32's."""
    def run(ctx: Context) -> dict[str, Any]:
        out: dict[str, Any] = {"batch": 2 * ctx.sizes.batch}
        images = torch.randn(2 * ctx.sizes.batch, 3, ctx.sizes.crop, ctx.sizes.crop,
                             generator=torch.Generator().manual_seed(1))
        features = {}
        for precision in precisions(ctx.device):
            execution, model = network(ctx, arch, precision)
            model.eval()
            batch = execution.images(images)

            @torch.no_grad()
            def forward() -> torch.Tensor:
                with execution.autocast():
                    return model.clustering_features(batch)

            features[precision] = forward().float()
            seconds = seconds_of(ctx.device, lambda: [forward() for _ in range(ctx.sizes.steps)])
            out[f"{precision}_img_s"] = round(ctx.sizes.steps * len(images) / seconds, 1)
        if "bf16" in features:
            error = float((features["bf16"] - features["fp32"]).norm() / features["fp32"].norm())
            out["bf16_relative_error"] = round(error, 5)
            if not error < 0.05:  # bf16 keeps 8 mantissa bits: about 0.4% per value
                raise WrongResult(f"bf16 features differ from fp32 by {error:.3g} (relative)")
        return out
    return run


# --- clustering sections ----------------------------------------------------------------------

def power_law_features(rows: int, dim: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """ReLU of latent variance i^-1 along direction i, randomly mixed: the spectrum CNN
    features have (a mean far from zero, no flat tail)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    scales = torch.arange(1, dim + 1, device=device, dtype=torch.float32).pow(-0.5)
    mixing = torch.randn(dim, dim, generator=gen, device=device) / math.sqrt(dim)
    z = torch.randn(rows, dim, generator=gen, device=device).mul_(scales)
    return (z @ mixing).add_(0.05).relu_()


def fit_against_float64(x: torch.Tensor, out_dim: int) -> dict[str, Any]:
    """PCAStats and fit_whitening (the run's own path) on ``x``, and how much of the exact
    top-``out_dim`` variance (a float64 eigh on the CPU) the fitted subspace captures."""
    from dcluster.clustering.pca import PCAStats, fit_whitening

    synchronize(x.device)
    start = time.perf_counter()
    stats = PCAStats(x.shape[1], device=x.device).update(x)
    transform = fit_whitening(stats, out_dim)
    synchronize(x.device)
    seconds = time.perf_counter() - start
    cov = PCAStats(x.shape[1], device=x.device).update(x).covariance().cpu()  # fit spent stats
    exact = torch.linalg.eigh(cov).eigenvalues.flip(0)[:out_dim]
    # the projection's columns are eigenvectors scaled by 1/sqrt(lambda): unit length again
    vectors = transform.projection.double().cpu()
    vectors = vectors / torch.linalg.vector_norm(vectors, dim=0)
    captured = float(torch.einsum("di,de,ei->", vectors, cov, vectors) / exact.sum())
    iterations = re.search(r"\((\d+) iterations\)", transform.solver)
    return {"seconds": round(seconds, 2), "solver": transform.solver,
            "iterations": int(iterations.group(1)) if iterations else None,
            "fallback": transform.solver.startswith("eigh (fallback"),
            "captured_variance_vs_exact": round(captured, 7)}


def pca_eigensolver(ctx: Context) -> dict[str, Any]:
    """On a GPU: once under the flags a run's passes set (execution.enable_gpu_backends: TF32
    from Ampere on), reported; once in full float32, as the clustering stage must run (issue
    21, finding 9), checked: no eigh fallback and 0.999 of the exact variance captured."""
    sizes = ctx.sizes
    x = power_law_features(sizes.pca_rows, sizes.pca_in, ctx.device)
    out: dict[str, Any] = {"rows": sizes.pca_rows, "dim": f"{sizes.pca_in} -> {sizes.pca_out}"}
    if ctx.device.type == "cuda":
        from dcluster.parallel.execution import enable_gpu_backends

        enable_gpu_backends(ctx.device)
        out["tf32_on"] = torch.backends.cuda.matmul.allow_tf32
        out["under_training_flags"] = fit_against_float64(x, sizes.pca_out)
    # full float32 (the stage's own guard is dcluster.parallel.precision.full_float32 once finding 9's
    # fix is merged; the flags are set here so that the check runs on either side of it)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        checked = out["full_float32"] = fit_against_float64(x, sizes.pca_out)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    if checked["fallback"]:
        raise WrongResult(f"the eigensolver fell back to eigh in full float32: {out}")
    if not checked["captured_variance_vs_exact"] >= 0.999:
        raise WrongResult(f"the subspace captured too little of the exact variance: {out}")
    return out


def dcluster_kmeans(backend: str) -> Callable[[np.ndarray, int, int, torch.device], np.ndarray]:
    """dcluster's k-means (dcluster.clustering.kmeans) with ``backend`` on every point, on the
    GPU when there is one."""
    def cluster(x: np.ndarray, k: int, seed: int, device: torch.device) -> np.ndarray:
        from dcluster.clustering.kmeans import run_kmeans

        return run_kmeans(x, k, seed=seed, backend=backend, own_device=device,
                          device="gpu" if device.type == "cuda" else "cpu").labels
    return cluster


@dataclass(frozen=True)
class KMeansBackend:
    needs: tuple[str, ...]  # installed_parts() keys that must be true
    cluster: Callable[[np.ndarray, int, int, torch.device], np.ndarray]  # (x, k, seed, dev)


# One entry per k-means engine; each becomes a section `kmeans[<name>]` (torch: with its
# assignment rate, :func:`assignment_rate`).
KMEANS_BACKENDS: dict[str, KMeansBackend] = {
    "torch": KMeansBackend((), dcluster_kmeans("torch")),
    "faiss": KMeansBackend(("faiss",), dcluster_kmeans("faiss")),
}


def gemm_rate(device: torch.device, rows: int, dim: int, k: int) -> float:
    """FLOP/s of this device's float32 GEMM (TF32 off, as the assignment runs) at the
    assignment's shape: ``rows`` x ``dim`` times ``dim`` x ``k``."""
    from dcluster.clustering.assign import exact_float32_matmul

    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(rows, dim, generator=gen, device=device)
    b = torch.randn(dim, k, generator=gen, device=device)
    out = torch.empty(rows, k, device=device)  # one product's room (16 GB on an H100), reused
    repeats = 3
    with exact_float32_matmul():
        torch.mm(a, b, out=out)  # warm-up: cuBLAS's handle and heuristics
        seconds = seconds_of(device, lambda: [torch.mm(a, b, out=out) for _ in range(repeats)])
    del out
    return repeats * 2.0 * rows * dim * k / seconds


def assignment_rate(ctx: Context) -> dict[str, Any]:
    """The PyTorch backend's assignment (GEMM, argmin, exact sums) at rate_rows x rate_dim,
    k = rate_k, in FLOP/s of its GEMM and as a share of the plain GEMM's rate at the chunk
    shape it runs; rows resident on the device and streamed from host memory, which must
    assign alike."""
    from dcluster.clustering.assign import TorchAssign, scratch_rows

    sizes = ctx.sizes
    gen = torch.Generator(device=ctx.device).manual_seed(2)
    x = torch.randn(sizes.rate_rows, sizes.rate_dim, generator=gen, device=ctx.device)
    x = torch.nn.functional.normalize(x, dim=1).cpu().numpy()
    centroids = x[:sizes.rate_k].copy()
    flops = 2.0 * sizes.rate_rows * sizes.rate_dim * sizes.rate_k
    chunk = min(sizes.rate_rows, scratch_rows(ctx.device, sizes.rate_k, sizes.rate_dim))
    gemm = gemm_rate(ctx.device, chunk, sizes.rate_dim, sizes.rate_k)
    out: dict[str, Any] = {"rows": sizes.rate_rows, "dim": sizes.rate_dim, "k": sizes.rate_k,
                           "chunk_rows": chunk, "gemm_tflops": round(gemm / 1e12, 2)}
    labels = {}
    for mode in ("resident", "streamed"):
        data = TorchAssign(x, [ctx.device], resident=mode == "resident")
        labels[mode] = data.assign_to(centroids, with_sums=True).labels  # warm-up
        repeats = 2
        seconds = seconds_of(ctx.device, lambda: [data.assign_to(centroids, with_sums=True)
                                                  for _ in range(repeats)])
        rate = repeats * flops / seconds
        out[mode] = {"seconds_per_pass": round(seconds / repeats, 3),
                     "tflops": round(rate / 1e12, 2), "share_of_gemm": round(rate / gemm, 3)}
        del data
    if not np.array_equal(labels["resident"], labels["streamed"]):
        raise WrongResult(f"streamed rows assign unlike resident ones: {out}")
    return out


def kmeans_torch(ctx: Context) -> dict[str, Any]:
    return {**kmeans_section(KMEANS_BACKENDS["torch"])(ctx), "rate": assignment_rate(ctx)}


def kmeans_section(backend: KMeansBackend) -> Callable[[Context], dict[str, Any]]:
    def run(ctx: Context) -> dict[str, Any]:
        from dcluster.core.metrics import nmi

        sizes = ctx.sizes
        rng = np.random.default_rng(0)
        blobs = max(2, sizes.kmeans_k // 4)  # 4 centroids a blob: no local optimum merges two
        centres = rng.standard_normal((blobs, sizes.kmeans_dim)).astype(np.float32)
        truth = rng.integers(0, blobs, sizes.kmeans_rows)
        x = centres[truth] + 0.02 * rng.standard_normal(
            (sizes.kmeans_rows, sizes.kmeans_dim)).astype(np.float32)
        start = time.perf_counter()
        labels = np.asarray(backend.cluster(x, sizes.kmeans_k, 0, ctx.device))
        seconds = time.perf_counter() - start
        # purity: the share of points whose cluster's most common blob is their own
        counts = np.zeros((sizes.kmeans_k, blobs), dtype=np.int64)
        np.add.at(counts, (labels, truth), 1)
        purity = counts.max(axis=1).sum() / len(x)
        out = {"rows": sizes.kmeans_rows, "dim": sizes.kmeans_dim, "k": sizes.kmeans_k,
               "blobs": blobs, "seconds": round(seconds, 2), "purity": round(float(purity), 5),
               "nmi_to_blobs": round(nmi(truth, labels), 4)}
        if not purity >= 0.99:
            raise WrongResult(f"k-means clusters mix separated blobs (purity {purity:.4f}): {out}")
        return out
    return run


# --- runs of `dcluster train` -----------------------------------------------------------------

def write_images(root: Path, count: int, size: int) -> None:
    """``count`` JPEGs in 10 class folders: smooth colour fields, one hue per class, so the
    run has something to cluster (no sample-data package needed on a bare host)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    for n in range(count):
        label = n % 10
        colour = np.array([(label * 37) % 255, (label * 91) % 255, (label * 151) % 255],
                          dtype=np.float32)
        field = ramp[None, :, None] * colour + ramp[:, None, None] * (255 - colour)
        noisy = field / 2 + rng.normal(0, 20, (size, size, 3))
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{n:05d}.jpg",
                                                                   quality=90)


def data_folder(ctx: Context) -> tuple[Path, str]:
    """The runs' images and what they are: ``--digits`` (the folder `make gpu-check-wheels`
    writes beside the wheels), else the demo digits written here where scikit-learn is
    installed (full sizes), else synthetic colour fields (``--quick``, or a bare host
    without them)."""
    if ctx.digits is not None:
        return ctx.digits, f"demo digits ({ctx.digits})"
    if ctx.sizes is FULL and importlib.util.find_spec("sklearn") is not None:
        folder = ctx.work / "digits"
        run_logged([sys.executable, "-m", "dcluster", "demo-data", str(folder)],
                   ctx.work / "logs" / "demo_data.log", 300)
        return folder, "demo digits (dcluster demo-data)"
    folder = ctx.work / "images"
    if not folder.is_dir():
        write_images(folder, ctx.sizes.images, 40)
    return folder, f"{ctx.sizes.images} synthetic colour fields"


def train_command(ctx: Context, name: str, extra: tuple[str, ...]) -> list[str]:
    """`dcluster train` of the demo preset for 2 epochs, k-means with the PyTorch backend on
    this process's device (the GPU), bf16 where the GPU computes in it."""
    bf16 = ctx.device.type == "cuda" and bf16_supported(ctx.device)
    return [sys.executable, "-m", "dcluster", "train", "configs/demo.yaml", f"name={name}",
            f"data.path={data_folder(ctx)[0]}", f"runs_root={ctx.work / 'runs'}", "epochs=2",
            "data.loader=torchvision", "checkpoint.every_iterations=2", "progress=never",
            "tracking.enabled=false", "tracking.plots=false", "eval.class_kmeans=false",
            "clustering.backend=torch", f"optim.precision={'bf16' if bf16 else 'fp32'}",
            *ctx.sizes.run_overrides, *extra]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from dcluster.runtime.checkpoint import load_latest

    found = load_latest(run / "checkpoints")
    if found is None or found[0]["epoch"] != 2:
        raise WrongResult(f"no checkpoint of epoch 2 in {run}")
    return found[0]["model"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two state dicts' tensors."""
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()),
               default=0.0)


def run_logged(command: list[str], log: Path, timeout: float) -> None:
    with open(log, "w") as out:
        rc = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            timeout=timeout).returncode
    if rc != 0:
        raise WrongResult(f"`dcluster train` exit {rc}: {log.read_text()[-800:]}")


def kill_resume_section(name: str, extra: tuple[str, ...],
                        signum: signal.Signals) -> Callable[[Context], dict[str, Any]]:
    """An uninterrupted 2-epoch run; the same run sent ``signum`` once a checkpoint inside
    epoch 2 is complete (``ckpt_e000001_i<n>.pt`` and its ``.sha256``: 1 epoch done,
    iteration n > 0 of the next): SIGTERM stops it cleanly at its next stop point (exit 143),
    SIGKILL on the spot; then run again: it must resume inside epoch 2 and end with the
    uninterrupted weights."""
    def run(ctx: Context) -> dict[str, Any]:
        logs = ctx.work / "logs"
        deadline = time.perf_counter() + 600
        run_logged(train_command(ctx, f"{name}_straight", extra), logs / f"{name}_straight.log",
                   deadline - time.perf_counter())
        expected = final_weights(ctx.work / "runs" / f"{name}_straight")
        command = train_command(ctx, name, extra)
        checkpoints = ctx.work / "runs" / name / "checkpoints"
        with open(logs / f"{name}_stopped.log", "w") as out:
            proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
            try:
                signalled = False
                while proc.poll() is None and time.perf_counter() < deadline:
                    # a checkpoint is complete once its checksum file is (written last)
                    if [p for p in checkpoints.glob("ckpt_e000001_i*.pt.sha256")
                            if not p.name.endswith("_i0000000.pt.sha256")]:
                        proc.send_signal(signum)
                        signalled = True
                        break
                    time.sleep(0.05)  # polling a folder for a file another process writes
                stopped_rc = proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        run_logged(command, logs / f"{name}_resumed.log", deadline - time.perf_counter())
        resumed_text = (logs / f"{name}_resumed.log").read_text()
        diff = max_difference(expected, final_weights(ctx.work / "runs" / name))
        out = {"data": data_folder(ctx)[1], "signal": signum.name,
               "signalled_inside_epoch_2": signalled, "stopped_exit_code": stopped_rc,
               "resumed_inside_epoch_2": "inside epoch 2" in resumed_text,
               "equal_weights": diff == 0.0, "max_abs_difference": diff}
        tolerance = 0.0
        if ctx.device.type == "cuda":
            # cuDNN's weight gradients may use atomics: two uninterrupted runs differ too. A
            # second one measures by how much; the resumed run may differ 10 times as much.
            run_logged(train_command(ctx, f"{name}_again", extra), logs / f"{name}_again.log",
                       deadline - time.perf_counter())
            baseline = max_difference(expected, final_weights(ctx.work / "runs" / f"{name}_again"))
            out["uninterrupted_runs_max_abs_difference"] = baseline
            tolerance = 10 * baseline
        if signalled and not out["resumed_inside_epoch_2"]:
            raise WrongResult(f"stopped inside epoch 2 but did not resume there: {out}")
        if diff > tolerance:
            raise WrongResult(f"resumed weights differ from the uninterrupted run's: {out}")
        return out
    return run


def code_paths(ctx: Context) -> dict[str, bool]:
    text = "\n".join(p.read_text(errors="replace") for p in (ctx.work / "logs").glob("*.log"))
    return {name: marker in text for name, marker in PATH_MARKERS.items()}


def two_ranks(ctx: Context) -> dict[str, Any]:
    """One epoch of the same run on 2 ranks (torchrun, gloo: on one GPU both ranks share it,
    which NCCL refuses): DDP, the gathered clustering on rank 0's GPU and every collective
    of the run, which the single-process sections never call. It must finish with a
    checkpoint of epoch 1."""
    from dcluster.runtime.checkpoint import load_latest

    command = train_command(ctx, "two_ranks", ("epochs=1", "distributed.backend=gloo"))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m", "dcluster", *command[3:]]
    start = time.perf_counter()
    run_logged(launcher, ctx.work / "logs" / "two_ranks.log", 300)
    found = load_latest(ctx.work / "runs" / "two_ranks" / "checkpoints")
    if found is None or found[0]["epoch"] != 1:
        raise WrongResult("2 ranks: no checkpoint of epoch 1")
    return {"seconds": round(time.perf_counter() - start, 1), "ranks": 2, "backend": "gloo"}


def info(ctx: Context) -> dict[str, Any]:
    from dcluster.parallel.hardware import nvidia_driver

    done = subprocess.run([sys.executable, "-m", "dcluster", "info"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    (ctx.work / "logs" / "info.log").write_text(done.stdout + done.stderr)
    print(done.stdout, flush=True)
    lines = [line.strip() for line in done.stdout.splitlines()]
    driver = nvidia_driver()
    return {"rc": done.returncode, "driver": driver.version if driver else None,
            "backends": {name: line[len(name):].strip() for line in lines
                         for name in ("k-means backend", "k-NN backend", "PIC backend")
                         if line.startswith(name)},
            "problems": [line[len("problem"):].strip() for line in lines
                         if line.startswith("problem ")]}


def dali_epoch(ctx: Context) -> dict[str, Any]:
    """One epoch of the demo with DALI decoding on the GPU (nvJPEG): it must finish."""
    log = ctx.work / "logs" / "dali.log"
    command = [*train_command(ctx, "dali", ("epochs=1",)), "data.loader=dali",
               "data.decode_device=auto"]
    start = time.perf_counter()
    run_logged(command, log, 300)
    return {"seconds": round(time.perf_counter() - start, 1),
            "decoded_on_gpu": "DALI: decoding with nvJPEG" in log.read_text()}


# --- the sections, their needs and budgets ----------------------------------------------------

@dataclass(frozen=True)
class Section:
    name: str
    needs: tuple[str, ...]
    budget_s: float
    run: Callable[[Context], Any]


SECTIONS = [
    Section("info", ("faiss",), 30, info),
    Section("cli_train", ("torchvision", "faiss"), 120,
            kill_resume_section("cli_train", (), signal.SIGTERM)),
    Section("cli_train[2_ranks]", ("torchvision", "faiss"), 45, two_ranks),
    Section("kmeans[torch]", (), 60, kmeans_torch),
    Section("train_pass[alexnet]", (), 25, train_pass("alexnet")),
    Section("train_pass[resnet50]", ("torchvision",), 30, train_pass("resnet50")),
    Section("feature_pass[alexnet]", (), 15, feature_pass("alexnet")),
    Section("feature_pass[resnet50]", ("torchvision",), 20, feature_pass("resnet50")),
    Section("pca_eigensolver", (), 30, pca_eigensolver),
    Section("kmeans[faiss]", KMEANS_BACKENDS["faiss"].needs, 35,
            kmeans_section(KMEANS_BACKENDS["faiss"])),
    Section("dali", ("dali", "faiss"), 40, dali_epoch),
    Section("bank_kill_resume", ("torchvision", "faiss"), 90, kill_resume_section(
        "bank_kill_resume", ("clustering.features=training_pass", "clustering.bank.dtype=float16"),
        signal.SIGKILL)),
    Section("code_paths", (), 5, code_paths),
]


def skip_reason(section: Section, ctx: Context, spent: float) -> Optional[str]:
    missing = [need for need in section.needs if not ctx.installed[need]]
    if missing:
        return f"skipped: not installed ({', '.join(missing)})"
    if ctx.device.type == "cuda" and section.name.startswith("kmeans[faiss") \
            and not ctx.installed["faiss_gpu"]:
        return "skipped: not installed (a FAISS GPU build; faiss-cpu is)"
    if section.name == "dali" and ctx.device.type != "cuda":
        return "skipped: no CUDA GPU (DALI's GPU decoding)"
    if ctx.sizes is FULL and spent + section.budget_s > TOTAL_BUDGET_S:
        return f"skipped: the check's {TOTAL_BUDGET_S:.0f} s would be exceeded"
    return None


def run_section(section: Section, ctx: Context) -> tuple[str, Any]:
    """(status, result): ok | wrong | error | over budget; SIGALRM bounds its time."""
    def alarm(signum: int, frame: Any) -> None:
        raise OverBudget(f"over its budget of {section.budget_s:.0f} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    # the budgets are an idle H100 host's; --quick runs on shared CPUs, where start-ups of
    # `dcluster train` alone take tens of seconds: 20 times more
    signal.setitimer(signal.ITIMER_REAL, section.budget_s * (20 if ctx.sizes is QUICK else 1))
    try:
        return "ok", section.run(ctx)
    except OverBudget as err:
        return "over budget", str(err)
    except WrongResult as err:
        return "wrong", str(err)[:1500]
    except Exception as err:  # a crash in dcluster's GPU code is a failed check too
        return "error", f"{type(err).__name__}: {err}"[:1500]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--quick", action="store_true",
                        help="toy sizes; on a machine without a GPU, on the CPU")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    parser.add_argument("--digits", type=Path, default=DIGITS if DIGITS.is_dir() else None,
                        help="the demo digits (default: gpu-check-wheels/digits, written by "
                             "make gpu-check-wheels, if there)")
    parser.add_argument("--skip", nargs="+", default=[], choices=[s.name for s in SECTIONS],
                        metavar="SECTION", help="sections not to run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    installed = installed_parts()
    device = torch.device("cuda", 0) if installed["cuda"] else torch.device("cpu")
    work = args.keep or Path(tempfile.mkdtemp(prefix="dcluster_gpu_check_"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    ctx = Context(device, QUICK if args.quick else FULL, work, installed, args.digits)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if installed["cuda"] else "cpu",
        "torch": torch.__version__, "cuda_build": torch.version.cuda, "quick": args.quick,
        "installed": installed, "work": str(work), "sections": {}}
    spent, failed = 0.0, []
    for section in SECTIONS:
        reason = "skipped: --skip" if section.name in args.skip else skip_reason(section, ctx, spent)
        if reason is None and device.type == "cpu" and not args.quick:
            reason = "skipped: no CUDA GPU (--quick runs it on the CPU at toy sizes)"
        if reason is not None:
            report["sections"][section.name] = {"status": reason}
        else:
            start = time.perf_counter()
            status, result = run_section(section, ctx)
            seconds = time.perf_counter() - start
            spent += seconds
            report["sections"][section.name] = {"status": status, "seconds": round(seconds, 1),
                                                 "result": result}
            if status in ("wrong", "error"):
                failed.append(section.name)
        print(section.name, json.dumps(report["sections"][section.name]), flush=True)
        write_json(args.out, report)
    report["skipped"] = [name for name, s in report["sections"].items()
                         if s["status"].startswith("skipped")]
    report["failed"] = failed
    write_json(args.out, report)
    print(json.dumps(report))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

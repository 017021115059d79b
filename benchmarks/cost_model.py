"""What one DeepCluster epoch costs on real GPUs, per stage, before anyone books them.

A user planning ImageNet (1,281,167 images) or YFCC100M (95.9M) runs needs the time of an epoch
and the memory of a rank and a node before the job starts; nobody can measure that on this
CPU. So this model multiplies two kinds of numbers, kept apart:

* measured here, at run time: the FLOPs of one image through dcluster's own networks, built
  from the ImageNet presets exactly as ``dcluster train`` builds them
  (``build_model(cfg.model, cfg.data.crop_size)``), counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (which counts a multiply-add as 2 FLOPs, and only
  matmuls and convolutions); their feature width D and parameter count; and the bytes of every
  activation a training forward keeps, read with forward hooks at batch 1;
* published elsewhere, with their source, in the tables at the top of this file: datasheet
  peak rates, ResNet-50 / AlexNet / VGG16 training throughputs measured by their publishers,
  and a DALI decode rate. Anything not published is marked "estimated" with its reasoning.

A GPU's achieved fraction of its peak on convnet training is taken from a published ResNet-50
throughput on that GPU (the only network published on every GPU); a network's efficiency
relative to ResNet-50 comes from the one source that measured all three families on one GPU
(TensorFlow's DGX-1 P100 benchmarks), normalised by the FLOPs of the networks it ran (counted
here on torchvision's AlexNet, VGG16 and ResNet-50). A pass is compute-bound at that rate or
loader-bound at the published decode rate, whichever is slower. The k-means assignment, the
PCA and the monitor's k-NN are GEMMs at an assumed share of the float32 rate (the clustering
stage runs in full float32, TF32 off: dcluster/parallel/precision.py).

Two published epoch times check it: the DeepCluster paper (500 epochs of AlexNet in 12 days on
one P100) and swav's README (DeepCluster-v2, ResNet-50, 64 V100, 3 min 13 s an epoch). Run as
``.venv/bin/python benchmarks/cost_model.py [--out FILE]``: Markdown tables to stdout (or
FILE), and one JSON line last. It runs in seconds on a CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dcluster.methods import Config, load_config  # noqa: E402
from dcluster.models import DeepClusterNet, build_model  # noqa: E402
from dcluster.parallel.memory_plan import WORKING_SET, place_rows  # noqa: E402
from dcluster.parallel.memory_plan import Memory as PlanMemory  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Published constants. Every number here is someone else's measurement or datasheet figure
# (source in the comment), or an estimate that says so and why.
# ---------------------------------------------------------------------------------------------

# Vendor datasheet peaks, dense (no 2:4 sparsity), TFLOP/s at boost clock, SXM variants:
# P100: "NVIDIA Tesla P100" datasheet (NVLink/SXM2: 10.6 FP32, 21.2 FP16);
# V100: "NVIDIA Tesla V100" datasheet (SXM2: 15.7 FP32, 125 tensor);
# A100: "NVIDIA A100 Tensor Core GPU" datasheet (SXM: 19.5 FP32, 156 TF32, 312 BF16/FP16);
# H100: "NVIDIA H100 Tensor Core GPU" datasheet (SXM5: 67 FP32, 989 TF32 and 1,979 BF16 with
# sparsity, i.e. 494.7 and 989.4 dense). HBM bandwidth (TB/s) from the same datasheets.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "P100": {"fp32": 10.6, "half": 21.2},
    "V100": {"fp32": 15.7, "half": 125.0},
    "A100": {"fp32": 19.5, "tf32": 156.0, "half": 312.0},
    "H100": {"fp32": 67.0, "tf32": 494.7, "half": 989.4},
}
HBM_TB_S = {"P100": 0.732, "V100": 0.900, "A100": 2.039, "H100": 3.35}
GPU_MEMORY_GB = {"P100": 16.0, "V100": 32.0, "A100": 80.0, "H100": 80.0}

TF_BENCH = ("tensorflow.org/performance/benchmarks (tensorflow docs_src/performance/"
            "benchmarks.md), DGX-1 P100, TF, May 2017")
DLE_RN50 = ("NVIDIA/DeepLearningExamples PyTorch/Classification/ConvNets/resnet50v1.5/README.md, "
            "pytorch-21.03 NGC container, DALI")


@dataclass(frozen=True)
class Published:
    """One published training throughput of one GPU (img/s per GPU, 1 GPU), and the 8-GPU
    strong scaling (8-GPU img/s over 8 x the 1-GPU img/s) the same source measured."""
    img_s: float
    scaling_8: float
    source: str


# ResNet-50 training throughput, per GPU and precision mode ("fp32": FP32 or TF32 as the GPU
# does it; "half": mixed precision). All measured by their publishers.
RESNET50_TRAIN: dict[tuple[str, str], Published] = {
    ("P100", "fp32"): Published(219.0, 1734.0 / 8 / 219.0, TF_BENCH + ", synthetic, batch 64"),
    ("V100", "fp32"): Published(356.0, 7.75 / 8, DLE_RN50 + ", DGX-1 V100 32GB, FP32"),
    ("V100", "half"): Published(1156.0, 6.96 / 8, DLE_RN50 + ", DGX-1 V100 32GB, AMP"),
    ("A100", "fp32"): Published(938.0, 7.72 / 8, DLE_RN50 + ", DGX A100 80GB, TF32"),
    ("A100", "half"): Published(2470.0, 6.72 / 8, DLE_RN50 + ", DGX A100 80GB, AMP"),
}
# No H100 ResNet-50 PyTorch throughput was found in the searched sources. Estimated: the A100's
# published throughput times the HBM bandwidth ratio (3.35 / 2.039 = 1.64), because the A100
# reaches only 15-19 % of its tensor peak on ResNet-50 (BatchNorm, ReLU and pooling are
# memory-bound), so peak FLOPs would overstate the H100 by 3.2x.
H100_FROM_A100 = HBM_TB_S["H100"] / HBM_TB_S["A100"]

# The one source with all three families on one GPU (1 P100, batch 64; AlexNet 512), the
# networks it ran being torchvision-like RGB AlexNet (64-192-384-256-256), VGG16, ResNet-50.
P100_FAMILIES = {"alexnet": 2987.0, "vgg16": 154.0, "resnet50": 219.0}

# Input pipeline per GPU, img/s of decode + random-resized crop (the limit of a pass).
LOADER_IMG_S: dict[str, tuple[float, str]] = {
    # measured: 1 P100 of a DGX-1 trained AlexNet on real ImageNet JPEGs at 2,890 img/s
    # (synthetic: 2,987), its CPU input pipeline nearly saturated (8 GPUs: "maxing out").
    "P100": (2890.0, "measured, " + TF_BENCH + ", real data, AlexNet"),
    # estimated: the A100's CUDA (no hardware decoder) figure scaled by SM count 80/108.
    "V100": (4400.0, "estimated: A100 CUDA-decode 6,000 img/s x 80/108 SMs"),
    # measured: NVIDIA blog "Loading Data Fast with DALI and the New Hardware JPEG Decoder in
    # NVIDIA A100 GPUs": ~7,000 img/s ImageNet decode with hw_decoder_load 0.75 (6,000 CUDA
    # only), figures as quoted in NVIDIA/DALI issue #5362.
    "A100": (7000.0, "measured, NVIDIA DALI A100 hardware-decoder blog (via NVIDIA/DALI#5362)"),
    # estimated: the A100 figure (the H100 has more NVJPG engines; kept conservative).
    "H100": (7000.0, "estimated: A100's figure (no published H100 DALI ImageNet rate found)"),
}

# Estimated: share of the float32 peak a large GEMM reaches (FAISS flat k-means assignment,
# k-NN, PCA covariance), a typical cuBLAS SGEMM share for inner dimensions of 256 and more.
GEMM_SHARE = 0.7
# Estimated: GPU memory a process holds before any tensor (CUDA context, cuDNN and cuBLAS
# handles and workspaces), typically 0.5-1 GB with torch's CUDA builds.
CUDA_CONTEXT = int(0.8e9)
# Estimated: checkpoint write by rank 0 (torch.save, fsync, then the SHA-256 pass over the
# file), on a local NVMe or a parallel file system.
CHECKPOINT_GB_S = 0.5

IMAGENET_N = 1_281_167
IMAGENET_VAL_N = 50_000
YFCC_N = 95_900_000   # YFCC100M's images as issue #30 counts them (the paper used 1M of them)
K = 10_000
NITER = 20
PCA_DIM = 256
CROP = 224
PRESETS = {"alexnet": "configs/deepcluster_alexnet_imagenet.yaml",
           "vgg16": "configs/deepcluster_vgg16_imagenet.yaml",
           "resnet50": "configs/deepcluster_resnet50_imagenet.yaml"}

# Published epoch times to check the model against (/work/shared/FACTS.md, fourth round).
PAPER_EPOCH_S = 12 * 24 * 3600 / 500       # DeepCluster paper: 500 epochs, 12 days, 1 P100
# swav README "Running times": DeepCluster-v2, batch 4096, 2x160 + 4x96, 64 V100
SWAV_DCV2_EPOCH_S = 3 * 60 + 13


# ---------------------------------------------------------------------------------------------
# Measured: the networks
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Network:
    """What the cost model needs of one network, all measured at run time."""
    arch: str
    flops_features: float     # one image, clustering_features (the feature pass), 2/MAC
    flops_train_forward: float  # one image, training forward with the k-way head
    feature_dim: int
    params: int               # every parameter, head included
    trainable: int            # those with momentum (all but the Sobel filters)
    buffers: int              # BatchNorm statistics
    activation_bytes_per_image: int  # outputs a training forward keeps, float32


def count_flops(fn: Callable[[], torch.Tensor]) -> float:
    """FLOPs of one call, as torch's counter sees them: matmuls and convolutions, 2 per
    multiply-add; BatchNorm, ReLU and pooling are not counted (they are memory-bound, which
    the published throughputs carry)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def kept_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the outputs of every leaf module in one training forward, leaving out in-place
    outputs (an in-place ReLU writes over its input, which is already counted): what autograd
    keeps for the backward, to within the saved inputs of in-place ops."""
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if not isinstance(output, torch.Tensor):
            return
        if inputs and isinstance(inputs[0], torch.Tensor) and \
                output.data_ptr() == inputs[0].data_ptr():
            return
        total += output.numel() * output.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if not list(m.children())]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return total


def preset_config(arch: str) -> Config:
    """The ImageNet preset of ``arch``; data.path points at an existing directory only because
    the config's validation checks that it exists (no image is read)."""
    return load_config(ROOT / PRESETS[arch], [f"data.path={ROOT}"])


def measure_network(arch: str, crop: int = CROP, k: int = K) -> Network:
    """dcluster's network of the ``arch`` preset, built as ``dcluster train`` builds it, with
    a k-way head, measured at batch 1 and ``crop`` pixels."""
    torch.manual_seed(0)
    cfg = preset_config(arch)
    model: DeepClusterNet = build_model(cfg.model, crop)
    model.reset_head(k, torch.Generator().manual_seed(0))
    x = torch.zeros(1, 3, crop, crop)
    with torch.no_grad():
        model.eval()
        features = count_flops(lambda: model.clustering_features(x))
        forward = count_flops(lambda: model(x))
        model.train()
        activations = kept_activation_bytes(model, x)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() for b in model.buffers())
    return Network(arch, features, forward, model.feature_dim, params, trainable, buffers,
                   activations)


def reference_flops(crop: int = CROP, names: tuple[str, ...] = ("alexnet", "vgg16", "resnet50")
                    ) -> dict[str, float]:
    """Forward FLOPs of the RGB networks the published throughputs were measured on
    (torchvision's AlexNet, VGG16, ResNet-50): they turn img/s into achieved FLOP/s. Built
    and run on the meta device: shapes only, no weights drawn, no arithmetic done."""
    import torchvision.models as tv

    out = {}
    for name in names:
        with torch.device("meta"):
            net = getattr(tv, name)().eval()
            x = torch.zeros(1, 3, crop, crop)
        out[name] = count_flops(lambda: net(x))
    return out


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    """A cluster: GPU type, nodes, GPUs per node, the precision of the passes."""
    name: str
    gpu: str
    nodes: int
    gpus_per_node: int
    precision: str = "fp32"   # "fp32" (TF32 on Ampere and later, dcluster's default), "half"

    @property
    def ranks(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Workload:
    """One dataset through one epoch of DeepCluster with the paper's clustering."""
    name: str
    n: int
    k: int = K
    niter: int = NITER
    pca_dim: int = PCA_DIM
    pca_sample: int = 25_000     # the presets' clustering.pca_sample; 0: every row (the paper)
    batch: int = 256             # per GPU (optim.batch_size)
    mode: str = "gather"         # clustering.mode: gather (the presets) k-means on rank 0's
    #                              GPU; sharded: on every rank (YFCC100M: 97 GB of vectors)
    monitor_every: int = 0       # the presets: off; 1: every epoch
    monitor_val: int = 0         # eval.val_path images (0: no labels, no monitor)


@dataclass
class Epoch:
    """Seconds per stage; ``total`` is their sum (the monitor amortised over monitor.every)."""
    features: float
    pca: float
    kmeans: float
    training: float
    checkpoint: float
    monitor: float            # one monitored epoch's monitor (0: not available)
    monitor_every: int
    bound: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> float:
        monitor = self.monitor / self.monitor_every if self.monitor_every else 0.0
        return self.features + self.pca + self.kmeans + self.training + self.checkpoint + monitor

    def stages(self) -> dict[str, float]:
        return {"features": self.features, "pca": self.pca, "kmeans": self.kmeans,
                "training": self.training, "checkpoint": self.checkpoint,
                "monitor": self.monitor}


def rate_key(gpu: str, precision: str) -> str:
    """The datasheet rate a pass runs at: FP32 on Pascal/Volta, TF32 (dcluster turns it on,
    dcluster/parallel/execution.py) on Ampere and later, or the half-precision tensor rate."""
    if precision == "half":
        return "half"
    return "tf32" if "tf32" in PEAK_TFLOPS[gpu] else "fp32"


def resnet50_published(gpu: str, precision: str) -> tuple[float, float, str]:
    """(img/s, 8-GPU scaling, label) of ResNet-50 training on one ``gpu``."""
    mode = "half" if precision == "half" else "fp32"
    if gpu == "H100":
        base = RESNET50_TRAIN[("A100", mode)]
        return (base.img_s * H100_FROM_A100, base.scaling_8,
                f"estimated: A100's {base.img_s:g} img/s x HBM ratio {H100_FROM_A100:.2f}")
    pub = RESNET50_TRAIN[(gpu, mode)]
    return pub.img_s, pub.scaling_8, f"measured: {pub.source}"


def achieved_tflops(gpu: str, precision: str, arch: str, ref: dict[str, float]) -> float:
    """Achieved training FLOP/s (TFLOP/s) of network family ``arch`` on one ``gpu``: the
    published ResNet-50 rate in FLOP/s, times the family's efficiency relative to ResNet-50 on
    the P100 (TensorFlow's benchmarks), carried over to other GPUs (an estimate)."""
    img_s, _, _ = resnet50_published(gpu, precision)
    rn50 = img_s * 3 * ref["resnet50"]
    relative = (P100_FAMILIES[arch] * ref[arch]) / (P100_FAMILIES["resnet50"] * ref["resnet50"])
    return rn50 * relative / 1e12


def gemm_seconds(flops: float, setup: Setup, gpus: int) -> float:
    """A float32 GEMM workload spread over ``gpus`` GPUs."""
    return flops / (gpus * PEAK_TFLOPS[setup.gpu]["fp32"] * 1e12 * GEMM_SHARE)


def checkpoint_bytes(net: Network, n: int) -> int:
    """Weights, BatchNorm buffers, SGD momentum of every trainable parameter (body and head),
    and the current and previous pseudo-labels (int64, runtime/run_state.py)."""
    return 4 * (net.params + net.buffers + net.trainable) + 16 * n


def epoch_cost(net: Network, setup: Setup, work: Workload, ref: dict[str, float]) -> Epoch:
    """Seconds of each stage of one epoch of ``net`` on ``setup`` over ``work``."""
    ranks = setup.ranks
    _, scaling_8, _ = resnet50_published(setup.gpu, setup.precision)
    scaling = 1.0 if ranks == 1 else scaling_8
    # the published multi-GPU scaling applies to the compute; the loader is per GPU
    tflops = achieved_tflops(setup.gpu, setup.precision, net.arch, ref) * 1e12 * scaling
    loader = LOADER_IMG_S[setup.gpu][0]
    train_img_s = min(tflops / (3 * net.flops_train_forward), loader)
    feature_img_s = min(tflops / net.flops_features, loader)
    bound = {"training": "loader" if train_img_s == loader else "compute",
             "features": "loader" if feature_img_s == loader else "compute"}
    d = net.feature_dim
    features = work.n / (feature_img_s * ranks)
    training = work.n / (train_img_s * ranks)
    # PCA: covariance of the sampled rows (2 N D^2, all-reduced), the eigensolver (~D^3 on
    # rank 0), and every rank projecting its own rows (2 N D p)
    rows = work.pca_sample or work.n
    pca = gemm_seconds(2 * rows * d * d, setup, ranks) + gemm_seconds(d ** 3, setup, 1) + \
        gemm_seconds(2 * work.n * d * work.pca_dim, setup, ranks)
    # k-means: the assignment GEMM of every iteration (2 N k p), on rank 0's GPU (gather) or
    # over every rank (sharded)
    kmeans = gemm_seconds(2 * work.n * work.k * work.pca_dim * work.niter, setup,
                          ranks if work.mode == "sharded" else 1)
    checkpoint = checkpoint_bytes(net, work.n) / (CHECKPOINT_GB_S * 1e9)
    monitor = 0.0
    if work.monitor_val:
        # a feature pass over the train split and the held-out images, the k-NN of every
        # held-out image against the train rows (2 Q N D), the k-means probe (k = 1000 classes)
        # on the centred, L2-normalised D-dim features (evaluation/clusters.py)
        images = work.n + work.monitor_val
        monitor = images / (feature_img_s * ranks) + \
            gemm_seconds(2 * work.monitor_val * work.n * d, setup, ranks) + \
            gemm_seconds(2 * images * 1000 * d * work.niter, setup, ranks)
    return Epoch(features, pca, kmeans, training, checkpoint, monitor, work.monitor_every, bound)


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU rank, per node, per checkpoint."""
    state: int                # weights, BN buffers, SGD momentum (float32, also under AMP)
    training_peak: int        # state + gradients + the kept activations of one batch + context
    features_peak: int        # state + the rank's rows when on the GPU + the plan's working set
    feature_rows: int         # the rank's N/R x D float32 rows
    rows_on_gpu: bool         # the memory plan's decision for them
    gpu_capacity: int
    host_per_node: int
    checkpoint: int

    @property
    def gpu_peak(self) -> int:
        return max(self.training_peak, self.features_peak)


def memory(net: Network, setup: Setup, work: Workload) -> Memory:
    """GPU memory per rank at the two peaks of an epoch, and host memory per node.

    The feature rows are placed by dcluster's own memory plan
    (``dcluster.parallel.memory_plan.place_rows``: on the GPU if they fit 0.8 x (free - 4 GiB
    working set), else in host memory), with the GPU's free memory taken as its capacity less
    the CUDA context and the model state. The training peak adds gradients and the kept
    activations of a batch (half their float32 bytes under mixed precision). Host memory per
    node holds, on each rank, the N pseudo-labels of this and the last clustering and the
    balanced order (3 x 8 B per image: every rank holds all of them), the rank's reduced
    vectors (N/R x 256 float32, from which k-means copies its chunks) and the rows the plan
    put there; in gather mode rank 0's node also holds all N vectors."""
    capacity = int(GPU_MEMORY_GB[setup.gpu] * 1e9)
    state = 4 * (net.params + net.buffers + net.trainable)
    activations = net.activation_bytes_per_image * work.batch // (2 if setup.precision == "half"
                                                                   else 1)
    training_peak = CUDA_CONTEXT + state + 4 * net.trainable + activations
    per_rank = math.ceil(work.n / setup.ranks)
    free = capacity - CUDA_CONTEXT - state
    placement = place_rows("feature rows", per_rank, net.feature_dim, 4, torch.device("cuda"),
                           PlanMemory(gpu_free=free, gpu_total=capacity,
                                      host_available=1 << 62))
    rows = placement.nbytes
    features_peak = CUDA_CONTEXT + state + WORKING_SET + (rows if placement.on_gpu else 0)
    host_rank = 24 * work.n + per_rank * work.pca_dim * 4 + (0 if placement.on_gpu else rows)
    gathered = work.n * work.pca_dim * 4 if work.mode == "gather" else 0
    return Memory(state, training_peak, features_peak, rows, placement.on_gpu, capacity,
                  host_rank * setup.gpus_per_node + gathered, checkpoint_bytes(net, work.n))


# ---------------------------------------------------------------------------------------------
# The two checks against published epoch times
# ---------------------------------------------------------------------------------------------

def paper_check(alexnet: Network, ref: dict[str, float]) -> dict[str, float]:
    """The DeepCluster paper: AlexNet (BN, Sobel), batch 256, k = 10,000, PCA of every row,
    1 P100, FP32, a feature pass every epoch (its k-means "takes a third of the time")."""
    work = Workload("ImageNet", IMAGENET_N, pca_sample=0)
    cost = epoch_cost(alexnet, Setup("1 P100", "P100", 1, 1), work, ref)
    clustering_share = (cost.features + cost.pca + cost.kmeans) / cost.total
    return {"predicted_s": cost.total, "published_s": PAPER_EPOCH_S,
            "ratio": cost.total / PAPER_EPOCH_S, "clustering_share": clustering_share}


def swav_check(resnet50: dict[int, float]) -> dict[str, float]:
    """swav's DeepCluster-v2 run of its README's "Running times" table (3 min 13 s an epoch):
    ``scripts/deepclusterv2_400ep_pretrain.sh``, 8 nodes x 8 V100, batch 64 per GPU, crops
    2 x 160 + 4 x 96, ResNet-50 (RGB) with a 2048-2048-128 MLP and three 3,000-way prototype
    heads, FP32 (``main_deepclusterv2.py`` has no mixed precision; apex serves LARC and
    SyncBN only), no extra feature pass (the training forward fills the memory bank), three
    k-means of k = 3,000 on the 128-d bank, 10 iterations each. ``resnet50``: the backbone's
    forward FLOPs by crop size, measured."""
    head = 2 * (2048 * 2048 + 2048 * 128 + 128 * 3 * 3000)
    forward = 2 * (resnet50[160] + head) + 4 * (resnet50[96] + head)
    setup = Setup("64 V100", "V100", 8, 8)
    img_s, scaling_8, _ = resnet50_published("V100", "fp32")
    flops_s = img_s * 3 * resnet50[224] * setup.ranks * scaling_8
    training = IMAGENET_N * 3 * forward / flops_s
    kmeans = gemm_seconds(3 * 2 * IMAGENET_N * 3000 * 128 * 10, setup, setup.ranks)
    total = training + kmeans
    return {"predicted_s": total, "published_s": SWAV_DCV2_EPOCH_S,
            "ratio": total / SWAV_DCV2_EPOCH_S, "crops_flops_over_one_224": forward / resnet50[224],
            "img_s_per_gpu": IMAGENET_N / training / setup.ranks}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

SETUPS = (
    Setup("1 P100", "P100", 1, 1),
    Setup("8 V100 (1 node)", "V100", 1, 8),
    Setup("4 x 8 A100", "A100", 4, 8),
    Setup("4 x 8 A100, bf16", "A100", 4, 8, "half"),
    Setup("4 x 8 H100", "H100", 4, 8),
    Setup("4 x 8 H100, bf16", "H100", 4, 8, "half"),
)


def hms(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n < 1e12 else f"{n / 1e12:.2f} TB"


def report(nets: dict[str, Network], ref: dict[str, float], workloads: tuple[Workload, ...],
           checks: dict[str, dict[str, float]]) -> tuple[str, dict]:
    """The Markdown tables and the JSON summary."""
    lines = ["## Networks (measured: torch.utils.flop_counter, batch 1, 224 px, 2 FLOPs per "
             "multiply-add)", "",
             "| network | GFLOPs feature pass | GFLOPs training forward (k = 10,000 head) | "
             "D | parameters | kept activations / image |", "|---|---|---|---|---|---|"]
    for net in nets.values():
        lines.append(f"| {net.arch} | {net.flops_features / 1e9:.2f} | "
                     f"{net.flops_train_forward / 1e9:.2f} | {net.feature_dim} | "
                     f"{net.params / 1e6:.1f} M | {net.activation_bytes_per_image / 1e6:.1f} MB |")
    lines += ["", "Reference networks of the published throughputs (torchvision, RGB, measured): "
              + ", ".join(f"{k} {v / 1e9:.2f} GFLOPs" for k, v in ref.items()), ""]
    lines += ["## Throughput per GPU", "",
              "| GPU | mode | ResNet-50 img/s (source) | loader img/s (source) |",
              "|---|---|---|---|"]
    for setup in SETUPS:
        img_s, _, label = resnet50_published(setup.gpu, setup.precision)
        loader, loader_src = LOADER_IMG_S[setup.gpu]
        lines.append(f"| {setup.gpu} | {rate_key(setup.gpu, setup.precision)} | {img_s:.0f} "
                     f"({label}) | {loader:.0f} ({loader_src}) |")
    summary: dict = {"networks": {}, "setups": {}, "checks": checks}
    for net in nets.values():
        summary["networks"][net.arch] = {"gflops_forward": round(net.flops_train_forward / 1e9, 3),
                                         "gflops_features": round(net.flops_features / 1e9, 3),
                                         "feature_dim": net.feature_dim, "params": net.params}
    for work in workloads:
        for setup in SETUPS:
            lines += ["", f"## {work.name} ({work.n:,} images) on {setup.name} "
                      f"({rate_key(setup.gpu, setup.precision)}, clustering.mode={work.mode})",
                      "",
                      "| network | features | PCA | k-means | training | checkpoint | "
                      "**epoch** | monitor (when on) | GPU mem / rank | host mem / node | "
                      "checkpoint |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            for net in nets.values():
                cost = epoch_cost(net, setup, work, ref)
                mem = memory(net, setup, work)
                where = "rows on GPU" if mem.rows_on_gpu else "rows on host"
                if mem.training_peak > mem.gpu_capacity:
                    where += f"; training over the {gb(mem.gpu_capacity)}: smaller batch"
                monitor = hms(cost.monitor) if cost.monitor else "n/a (no labels)"
                lines.append(
                    f"| {net.arch} | {hms(cost.features)} ({cost.bound['features']}) | "
                    f"{hms(cost.pca)} | {hms(cost.kmeans)} | {hms(cost.training)} "
                    f"({cost.bound['training']}) | {hms(cost.checkpoint)} | "
                    f"**{hms(cost.total)}** | {monitor} | {gb(mem.gpu_peak)} ({where}) | "
                    f"{gb(mem.host_per_node)} | {gb(mem.checkpoint)} |")
                key = f"{work.name}|{setup.name}|{net.arch}"
                summary["setups"][key] = {s: round(v, 1) for s, v in cost.stages().items()} | {
                    "total": round(cost.total, 1),
                    "gpu_gb_per_rank": round(mem.gpu_peak / 1e9, 1),
                    "host_gb_per_node": round(mem.host_per_node / 1e9, 1),
                    "checkpoint_gb": round(mem.checkpoint / 1e9, 2)}
    lines += ["", "## Checks against published epoch times", "",
              "| published | predicted | published | predicted / published |", "|---|---|---|---|",
              f"| DeepCluster paper, AlexNet, 1 P100 | {hms(checks['paper']['predicted_s'])} | "
              f"{hms(checks['paper']['published_s'])} | {checks['paper']['ratio']:.2f} |",
              f"| swav DeepCluster-v2, ResNet-50, 64 V100 | {hms(checks['swav']['predicted_s'])} | "
              f"{hms(checks['swav']['published_s'])} | {checks['swav']['ratio']:.2f} |"]
    return "\n".join(lines) + "\n", summary


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the Markdown tables here, not stdout")
    parser.add_argument("--monitor-every", type=int, default=0,
                        help="count the ImageNet monitor (val_path: 50,000 images) every n "
                             "epochs in the total; 0 (the presets): off, shown apart")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ref = reference_flops()
    nets = {arch: measure_network(arch) for arch in PRESETS}
    resnet50 = {size: reference_flops(size, ("resnet50",))["resnet50"] for size in (160, 96)} | \
        {CROP: ref["resnet50"]}
    checks = {"paper": paper_check(nets["alexnet"], ref),
              "swav": swav_check(resnet50)}
    workloads = (Workload("ImageNet", IMAGENET_N, monitor_every=args.monitor_every,
                          monitor_val=IMAGENET_VAL_N),
                 Workload("YFCC100M", YFCC_N, mode="sharded"))
    text, summary = report(nets, ref, workloads, checks)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    summary["checks"] = {name: {k: round(v, 3) for k, v in check.items()}
                         for name, check in checks.items()}
    print(json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
    main()

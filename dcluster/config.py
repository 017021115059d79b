"""The typed configuration schema, YAML loading with ``key=value`` overrides, and validation.

Every value a run depends on lives here so that a mistyped key or an impossible value is
rejected before any image is read: a bad config caught at start-up costs seconds, one caught
after the first feature pass costs hours on ImageNet.
"""
from __future__ import annotations

import dataclasses
import typing
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from dcluster.errors import UserError
from dcluster.methods import METHODS


class ConfigError(ValueError, UserError):
    """A configuration problem, with the offending key and value in the message."""


@dataclass
class DataConfig:
    path: str = "???"  # image folder tree (class folders or a flat folder) or tar shard folder
    source: str = "auto"  # auto | folder | shards; auto: shards if the folder holds .tar files
    loader: str = "dali"  # dali | torchvision (PIL decoding, the fallback)
    decode_device: str = "auto"  # dali only: auto (GPU if this process has one) | cpu | gpu
    crop_size: int = 224  # side of the centre crop (feature pass) and random crop (training)
    resize_size: int = 256  # shorter side before the centre crop of the feature pass
    min_scale: float = 0.08  # lower bound of the random-resized-crop area fraction
    workers: int = 2  # torchvision: decoding processes (0: main process); dali: threads
    max_bad_fraction: float = 0.01  # unreadable images tolerated before the run stops
    grayscale_stats: bool = False  # normalise with one mean/std for grayscale sources


@dataclass
class ModelConfig:
    # alexnet | vgg16 | smallconv | smallvgg (MMDC's MNIST net) | resnet18 | resnet50
    # (torchvision's, untrained)
    arch: str = "alexnet"
    sobel: bool = True  # fixed grayscale + Sobel front end (not trained)
    dropout: float = 0.5  # in the fully connected classifier
    width: int = 64  # first channel width of smallconv and smallvgg (ignored by others)
    # Units of the fully connected layers (the feature dimension); 0: no fully connected
    # layers, the head sits on the pooled conv output (ResNet style, as MMDC uses ResNet-18).
    fc_dim: int = 4096
    # Linear-layer init: "paper" draws N(0, 0.01), which keeps the signal's scale only for
    # fan-ins near 10^4 (AlexNet's 9216); "fan_in" draws N(0, 1/fan_in) for small models.
    fc_init: str = "paper"
    # NHWC images and conv weights: auto (on a GPU, where tensor cores want it) | always | never
    channels_last: str = "auto"


@dataclass
class OptimConfig:
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-5
    batch_size: int = 256  # per process
    lr_scaling: str = "none"  # none | linear (lr * world_size); the paper uses none
    # autocast dtype of the training and feature passes: fp32 (none) | bf16 | fp16 (with
    # loss scaling, its state in the checkpoint)
    precision: str = "fp32"


@dataclass
class ExtractConfig:
    batch_size: int = 512  # per process, the clustering feature pass (no gradients kept)


@dataclass
class PICConfig:
    sigma: float = 0.2  # bandwidth of the Gaussian edge weights
    alpha: float = 1e-3  # regularisation of the power iteration
    knn: int = 5  # neighbours per node in the graph
    iterations: int = 10  # power iterations


@dataclass
class BankConfig:
    """The feature bank of clustering.features=training_pass (dcluster/feature_bank.py)."""
    # a row the training passes have not rewritten for more than this many epochs is
    # recomputed (centre crop, eval mode) before the clustering; 1: every image the last
    # epoch did not draw (README: "Clustering the training pass's features")
    max_age: int = 1
    dtype: str = "float32"  # float32 | float16 | bfloat16: how the rows are stored
    # a training row blends into the row held: m * held + (1 - m) * new (0: replaces it)
    momentum: float = 0.9
    # device: the rank's GPU (its CPU without one); host: host memory (for a bank larger
    # than the GPU can spare)
    memory: str = "device"


@dataclass
class ClusteringConfig:
    method: str = "kmeans"  # kmeans | pic
    # extra_pass: a forward pass over every image (centre crops, eval mode) before each
    # clustering (the paper); training_pass: the features the last epoch's training forward
    # computed, kept in a bank sharded across ranks (SwAV's DeepClusterV2)
    features: str = "extra_pass"
    bank: BankConfig = field(default_factory=BankConfig)
    k: int = 10000
    pca_dim: int = 256  # 0 keeps the full dimension
    # rows the PCA covariance is computed from, drawn per (seed, epoch); 0: all rows (the
    # paper). A fixed budget bounds the cost as N grows (README: "Clustering stage")
    pca_sample: int = 25000
    whiten: bool = True
    l2_normalize: bool = True
    niter: int = 20  # k-means iterations
    max_points_per_centroid: int = 0  # 0 means no subsampling (the paper's setting)
    device: str = "auto"  # auto | cpu | gpu
    # what assigns rows to centroids: auto (FAISS where its build has code for the GPUs,
    # PyTorch on GPUs it has none for, FAISS on the CPU) | faiss | torch
    backend: str = "auto"
    every: int = 1  # re-cluster every n epochs (the paper: every epoch)
    # gather: the 256-d vectors of all ranks go to rank 0, which clusters them (k-means or
    # PIC); sharded: Lloyd iterations across ranks, no rank holds more than its own shard
    # (k-means only; for N x pca_dim floats too large for one host, e.g. YFCC100M)
    mode: str = "gather"
    pic: PICConfig = field(default_factory=PICConfig)


@dataclass
class DistributedConfig:
    """How the processes of a multi-process job talk; the launch itself (torchrun, Slurm,
    submitit) is read from the environment (dcluster/distributed.py)."""
    backend: str = "auto"  # auto (nccl when each process has a GPU, else gloo) | gloo | nccl
    # A collective waits this long for the slowest rank before the job fails. It must exceed
    # the longest step one rank does while the others wait: rank 0's k-means in gather mode
    # (minutes at ImageNet scale) and its checkpoint writes.
    timeout_s: float = 1800.0
    # DDP's gradient all-reduce: none (float32) | bf16 (halves the bytes between nodes)
    grad_compression: str = "none"


@dataclass
class CheckpointConfig:
    interval: int = 1  # epochs between checkpoints
    keep_last: int = 3
    # Mid-epoch checkpoints as well (0: off), for epochs too long to lose (YFCC100M): every
    # this many training iterations, and/or every this many minutes (rank 0's clock).
    every_iterations: int = 0
    every_minutes: float = 0.0
    # Iterations between the all-ranks agreements on a stop signal or a timed checkpoint; a
    # stop comes within this many iterations. 0: auto, every iteration on the CPU (a step
    # waits for its own work anyway) and every 20 on a GPU (each agreement makes the host
    # wait for the GPU to drain its queue).
    poll_every: int = 0
    # A monitor_* metric (higher is better): the checkpoint of the epoch with its highest
    # value is kept as checkpoints/best.pt beside the last keep_last; empty: none kept.
    keep_best: str = ""


@dataclass
class MonitorConfig:
    """The online monitor (dcluster/monitor.py): `eval knn` and `eval clusters` measured
    during training on the held-out labels of eval.val_path / eval.val_fraction."""
    every: int = 0  # measure after every n-th epoch and the last; 0: off


# what the monitor logs each measured epoch (higher is better: checkpoint.keep_best names one)
MONITOR_METRICS = ("monitor_knn_top1", "monitor_knn_top5", "monitor_kmeans_nmi",
                   "monitor_kmeans_acc")


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # empty: sqlite:///<runs_root>/mlflow.db
    experiment: str = "dcluster"
    plots: bool = True


@dataclass
class MMDCConfig:
    """Multi-Modal Deep Clustering (Shiran & Weinshall): targets from a mixture of K Gaussians
    on the unit sphere, re-assigned by the Hungarian method within each mini-batch."""
    k: int = 10  # mixture components = clusters
    dim: int = 0  # embedding dimension d; 0: d = k (one-hot means need d = k)
    means: str = "onehot"  # onehot (the paper's choice) | uniform (U[-0.1, 0.1]^d, projected)
    # Per-coordinate standard deviation of each component before the projection to the sphere
    # (the paper writes sigma * I; its code draws with sigma as the std); 0: targets = means.
    sigma: float = 0.0
    rotation: bool = True  # the auxiliary 4-way rotation task after each clustering pass
    refine_epochs: int = 0  # epochs after `epochs` with targets from k-means (paper III.E)
    lr_decay_epochs: list[int] = field(default_factory=list)  # lr divided at these epochs
    lr_decay_factor: float = 5.0


@dataclass
class KnnEvalConfig:
    k: int = 20  # neighbours (DINO's protocol)
    temperature: float = 0.07  # weights exp(cosine / temperature)


@dataclass
class LinearEvalConfig:
    """The linear probe of DeepCluster's section 4.3 (after Zhang et al.): a frozen conv layer,
    average-pooled to about `pooled_dim` values, BatchNorm, one linear layer, SGD."""
    # conv1..conv5 (alexnet, vgg16, resnet18/50), conv1..conv3 (smallconv), conv1..conv4 (smallvgg)
    layer: str = "conv5"
    pooled_dim: int = 9000
    epochs: int = 90
    lr: float = 0.01  # cosine-annealed to 0 over the epochs
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 256


@dataclass
class EvalConfig:
    # k-means with k = number of true classes on the clustering features, scored against the
    # classes each epoch; cheap on the demo, a real cost on ImageNet.
    class_kmeans: bool = False
    # `dcluster eval`: validation images from a second labelled folder tree with the same class
    # folders; empty: `val_fraction` of each class of data.path is held out (seeded).
    val_path: str = ""
    val_fraction: float = 0.2
    batch_size: int = 256  # feature passes of `dcluster eval`
    knn: KnnEvalConfig = field(default_factory=KnnEvalConfig)
    linear: LinearEvalConfig = field(default_factory=LinearEvalConfig)


@dataclass
class SlurmConfig:
    """Cluster defaults for `dcluster submit`; a team writes them once in a YAML file, the
    command line overrides them. None of them changes what the run computes."""
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    exclude: str = ""
    nodes: int = 1
    gpus_per_node: int = 0  # one task per GPU; 0: CPU-only tasks
    tasks_per_node: int = 1  # processes per node when gpus_per_node is 0
    cpus_per_task: int = 8
    mem_gb: int = 0  # 0: the partition's default
    time_min: int = 4320
    job_name: str = ""  # default: the run name
    log_dir: str = ""  # default: <run dir>/slurm
    max_requeues: int = 100  # timeouts/preemptions survived before the job gives up
    signal_delay_s: int = 120  # USR2 this long before the time limit: time to checkpoint


@dataclass
class Config:
    name: str = "???"  # run name: the run directory is <runs_root>/<name>
    runs_root: str = "runs"
    seed: int = 0
    epochs: int = 500
    resume: str = "auto"  # auto | never | <path to a checkpoint>
    overwrite: bool = False  # replace a run directory that holds another config's run
    threads: int = 0  # torch intra-op threads; 0 leaves the default
    progress: str = "auto"  # auto (tqdm on a terminal) | always | never
    method: str = "deepcluster"  # deepcluster | mmdc
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    mmdc: MMDCConfig = field(default_factory=MMDCConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


_CHOICES: dict[str, tuple[str, ...]] = {
    "data.loader": ("dali", "torchvision"),
    "data.source": ("auto", "folder", "shards"),
    "data.decode_device": ("auto", "cpu", "gpu"),
    "model.arch": ("alexnet", "vgg16", "smallconv", "smallvgg", "resnet18", "resnet50"),
    "model.fc_init": ("paper", "fan_in"),
    "model.channels_last": ("auto", "always", "never"),
    "optim.precision": ("fp32", "bf16", "fp16"),
    "distributed.grad_compression": ("none", "bf16"),
    "optim.lr_scaling": ("none", "linear"),
    "clustering.method": ("kmeans", "pic"),
    "clustering.device": ("auto", "cpu", "gpu"),
    "clustering.backend": ("auto", "faiss", "torch"),
    "clustering.mode": ("gather", "sharded"),
    "clustering.features": ("extra_pass", "training_pass"),
    "clustering.bank.dtype": ("float32", "float16", "bfloat16"),
    "clustering.bank.memory": ("device", "host"),
    "distributed.backend": ("auto", "gloo", "nccl"),
    "progress": ("auto", "always", "never"),
    "method": tuple(METHODS),
    "mmdc.means": ("onehot", "uniform"),
}

# Keys whose value changes what the run computes. A run directory refuses to resume under a
# config that differs in any other key than these, which only change how it is executed.
EXECUTION_ONLY_KEYS = frozenset(
    {"epochs", "resume", "overwrite", "threads", "progress", "data.workers", "tracking.uri",
     "tracking.plots", "checkpoint.keep_last", "checkpoint.interval", "data.path", "runs_root",
     "checkpoint.every_iterations", "checkpoint.every_minutes", "checkpoint.poll_every",
     "distributed.backend", "distributed.timeout_s", "monitor.every", "checkpoint.keep_best",
     "clustering.bank.memory",
     # the backends assign alike (tests/test_kmeans_engine.py): a run may resume on a node
     # whose GPUs need the other one
     "clustering.backend"}
    # what `dcluster eval` measures afterwards never changes what training computes
    | {f"eval.{key}" for key in ("val_path", "val_fraction", "batch_size")}
    | {f"eval.knn.{f.name}" for f in dataclasses.fields(KnnEvalConfig)}
    | {f"eval.linear.{f.name}" for f in dataclasses.fields(LinearEvalConfig)}
    | {f"slurm.{f.name}" for f in dataclasses.fields(SlurmConfig)}
)


def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            keys.extend(_valid_keys(value, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _expected_type(key: str) -> str:
    """The declared type of config key ``key`` ("int", "list[int]"...), read from the
    dataclasses: OmegaConf's error names the enclosing node's type, or Any."""
    node: Any = Config
    kind: Any = Config
    for part in key.split("."):
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            break
        kind = node = hints[part]
    return kind.__name__ if isinstance(kind, type) else str(kind)


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as err:
        key = f"{err.full_key}" if getattr(err, "full_key", None) else str(err)
        raise ConfigError(
            f"{source}: unknown config key '{key}'. Valid keys: {', '.join(_valid_keys(Config()))}"
        ) from None
    except ValidationError as err:
        raise ConfigError(
            f"{source}: key '{err.full_key}' has value {err.value!r} of the wrong type "
            f"(expected {_expected_type(str(err.full_key))})"
        ) from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {err}") from None


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Config:
    """Build the config from defaults, then a YAML preset, then ``key=value`` overrides."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # YAML syntax errors come in several exception types
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        merged = _merge(merged, loaded, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        merged = _merge(merged, OmegaConf.from_dotlist([item]), f"override '{item}'")
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"required config key(s) not set: {', '.join(missing)}")
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


def check_key(condition: bool, key: str, value: Any, why: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}' = {value!r}: {why}")


def validate(cfg: Config) -> None:
    """Reject values that would fail (or silently mislead) hours into a run."""
    flat = flatten(cfg)
    for key, choices in _CHOICES.items():
        check_key(flat[key] in choices, key, flat[key], f"must be one of {', '.join(choices)}")
    for key in ("epochs", "optim.batch_size", "clustering.k", "clustering.niter",
                "clustering.every", "checkpoint.interval", "checkpoint.keep_last",
                "data.crop_size", "data.resize_size", "clustering.pic.knn",
                "clustering.pic.iterations", "model.width", "eval.batch_size", "eval.knn.k",
                "eval.linear.pooled_dim", "eval.linear.epochs", "eval.linear.batch_size",
                "extract.batch_size", "clustering.bank.max_age"):
        check_key(flat[key] > 0, key, flat[key], "must be positive")
    for key in ("optim.lr", "clustering.pic.sigma", "eval.knn.temperature", "eval.linear.lr",
                "distributed.timeout_s"):
        check_key(flat[key] > 0, key, flat[key], "must be positive")
    for key in ("optim.momentum", "optim.weight_decay", "data.workers", "threads",
                "clustering.pca_dim", "clustering.pca_sample",
                "clustering.max_points_per_centroid", "seed",
                "model.fc_dim", "checkpoint.every_iterations", "checkpoint.every_minutes",
                "checkpoint.poll_every",
                "eval.linear.momentum", "eval.linear.weight_decay"):
        check_key(flat[key] >= 0, key, flat[key], "must not be negative")
    check_key(0.0 <= cfg.model.dropout < 1.0, "model.dropout", cfg.model.dropout,
              "must be in [0, 1)")
    check_key(0.0 <= cfg.clustering.bank.momentum < 1.0, "clustering.bank.momentum",
              cfg.clustering.bank.momentum, "must be in [0, 1)")
    check_key(0.0 < cfg.data.min_scale <= 1.0, "data.min_scale", cfg.data.min_scale,
           "must be in (0, 1]")
    check_key(0.0 <= cfg.data.max_bad_fraction < 1.0, "data.max_bad_fraction",
           cfg.data.max_bad_fraction, "must be in [0, 1)")
    check_key(cfg.clustering.pca_sample == 0
              or cfg.clustering.pca_sample > cfg.clustering.pca_dim,
              "clustering.pca_sample", cfg.clustering.pca_sample,
              f"must be 0 (all rows) or more than clustering.pca_dim ({cfg.clustering.pca_dim}) "
              "rows, or the covariance cannot have pca_dim directions")
    check_key(0.0 < cfg.clustering.pic.alpha < 1.0, "clustering.pic.alpha",
           cfg.clustering.pic.alpha, "must be in (0, 1)")
    check_key(cfg.data.resize_size >= cfg.data.crop_size, "data.resize_size",
           cfg.data.resize_size, f"must be at least data.crop_size ({cfg.data.crop_size})")
    check_key(bool(cfg.name) and "/" not in cfg.name and cfg.name not in (".", ".."), "name",
           cfg.name, "must be a plain directory name")
    check_key(0.0 < cfg.eval.val_fraction < 1.0, "eval.val_fraction", cfg.eval.val_fraction,
           "must be in (0, 1)")
    if cfg.eval.val_path:
        check_key(Path(cfg.eval.val_path).is_dir(), "eval.val_path", cfg.eval.val_path,
               "is not an existing directory")
    if cfg.clustering.mode == "sharded":
        validate_sharded(cfg)
    validate_monitor(cfg)
    if cfg.method == "mmdc":
        validate_mmdc(cfg)
        check_key(cfg.clustering.features == "extra_pass", "clustering.features",
                  cfg.clustering.features, "training_pass is DeepCluster's (method=deepcluster); "
                  "MMDC assigns its targets from its own passes")
    data_path = Path(cfg.data.path)
    check_key(data_path.is_dir(), "data.path", cfg.data.path, "is not an existing directory")


def validate_sharded(cfg: Config) -> None:
    """Sharded clustering is Lloyd's k-means over all points of all ranks: PIC needs the whole
    neighbour graph in one place, and subsampling would need a distributed draw it does not do."""
    check_key(cfg.clustering.method == "kmeans", "clustering.method", cfg.clustering.method,
           "clustering.mode=sharded runs k-means only; use clustering.mode=gather for PIC")
    check_key(cfg.clustering.max_points_per_centroid == 0, "clustering.max_points_per_centroid",
           cfg.clustering.max_points_per_centroid,
           "clustering.mode=sharded trains on every point: set it to 0")


def validate_monitor(cfg: Config) -> None:
    check_key(cfg.monitor.every >= 0, "monitor.every", cfg.monitor.every,
              "must not be negative (0: no monitor)")
    best = cfg.checkpoint.keep_best
    if not best:
        return
    check_key(best in MONITOR_METRICS, "checkpoint.keep_best", best,
              f"must be one of {', '.join(MONITOR_METRICS)}, or empty")
    check_key(cfg.monitor.every > 0, "checkpoint.keep_best", best,
              "needs the monitor: set monitor.every")
    # every measured epoch must end at a checkpoint, or the best one might have none
    check_key(cfg.monitor.every % cfg.checkpoint.interval == 0, "monitor.every",
              cfg.monitor.every, f"must be a multiple of checkpoint.interval "
              f"({cfg.checkpoint.interval}) with checkpoint.keep_best")


def validate_mmdc(cfg: Config) -> None:
    m = cfg.mmdc
    check_key(m.k >= 2, "mmdc.k", m.k, "must be at least 2")
    check_key(m.dim >= 0, "mmdc.dim", m.dim, "must not be negative (0: dim = mmdc.k)")
    if m.means == "onehot":
        check_key(m.dim in (0, m.k), "mmdc.dim", m.dim,
               f"one-hot means live in R^k: use 0 or mmdc.k ({m.k}), or mmdc.means=uniform")
    check_key(m.sigma >= 0.0, "mmdc.sigma", m.sigma, "must not be negative")
    check_key(m.refine_epochs >= 0, "mmdc.refine_epochs", m.refine_epochs, "must not be negative")
    check_key(m.lr_decay_factor >= 1.0, "mmdc.lr_decay_factor", m.lr_decay_factor,
           "must be at least 1 (the lr is divided by it)")
    check_key(all(e > 0 for e in m.lr_decay_epochs), "mmdc.lr_decay_epochs", m.lr_decay_epochs,
           "must hold positive epoch numbers")
    # the Hungarian step permutes targets among a batch's images: one image cannot move any
    check_key(cfg.optim.batch_size >= 2, "optim.batch_size", cfg.optim.batch_size,
           "must be at least 2 for method=mmdc")


def flatten(cfg: Config) -> dict[str, Any]:
    """The config as {'a.b': value}: MLflow params and key-wise comparisons use this form."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = value

    walk(cfg, "")
    return out


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml_file(path: Path) -> Config:
    """Read back a resolved config written by :func:`to_yaml` (no validation of data paths)."""
    merged = _merge(OmegaConf.structured(Config), OmegaConf.load(path), str(path))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def config_hash(cfg: Config) -> str:
    """Hash of the keys that change what a run computes (see EXECUTION_ONLY_KEYS)."""
    relevant = {k: v for k, v in flatten(cfg).items() if k not in EXECUTION_ONLY_KEYS}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def result_differences(a: Config, b: Config) -> list[str]:
    """Keys (outside EXECUTION_ONLY_KEYS) whose values differ, as 'key: a -> b'."""
    fa, fb = flatten(a), flatten(b)
    return [f"{k}: {fa[k]!r} -> {fb[k]!r}" for k in fa
            if k not in EXECUTION_ONLY_KEYS and fa[k] != fb[k]]

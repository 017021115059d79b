"""The typed configuration schema, YAML loading with ``key=value`` overrides, and validation.

Every value a run depends on lives here so that a mistyped key or an impossible value is
rejected before any image is read: a bad config caught at start-up costs seconds, one caught
after the first feature pass costs hours on ImageNet.

Each key is declared once, beside its field, with ``key()`` (dcluster/core/config_keys.py): its
meaning, choices or bounds, whether it changes the run's results (hashed) and, for a key added
after the first release, its legacy value. Validation, the settings a checkpoint records
(dcluster/core/config_settings.py), docs/configuration.md and ``dcluster train --help`` derive
from the declarations; only the checks across keys are code here.

Core knows no training method: a method's section (its keys) and its checks across keys live in
its folder (dcluster/methods/<name>/config.py), and :func:`compose_schema` adds them to
:class:`Config` above core, in dcluster/methods/__init__.py. Everything that reads the keys
takes that composed schema (or a config built from it).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Optional, Protocol, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from dcluster.core.config_keys import SameAs, declarations, execution_only, key
from dcluster.core.errors import UserError
from dcluster.core.suggest import closest


class ConfigError(ValueError, UserError):
    """A configuration problem, with the offending key and value in the message."""


# what the monitor logs each measured epoch (higher is better: checkpoint.keep_best names one)
MONITOR_METRICS = ("monitor_knn_top1", "monitor_knn_top5", "monitor_kmeans_nmi",
                   "monitor_kmeans_acc")


@dataclass
class DataConfig:
    path: str = key("???", "Image folder tree (class folders, or one flat folder) or folder of "
                    "tar shards.", hashed=False)
    source: str = key("auto", "auto: shards if the folder holds .tar files, else a folder.",
                      choices=("auto", "folder", "shards"))
    loader: str = key("dali", "dali, or torchvision (PIL decoding, the fallback).",
                      choices=("dali", "torchvision"))
    decode_device: str = key("auto", "dali only: auto (the GPU if this process has one), cpu "
                             "or gpu.", choices=("auto", "cpu", "gpu"))
    crop_size: int = key(224, "Side of the centre crop (feature pass) and of the random crop "
                         "(training).", bounds="> 0")
    resize_size: int = key(256, "Shorter side before the centre crop of the feature pass.",
                           bounds="> 0")
    min_scale: float = key(0.08, "Lower bound of the random-resized-crop area fraction.",
                           bounds="(0, 1]")
    flip: bool = key(True, "Horizontal flip of training crops with probability 1/2; false never "
                     "mirrors, for data whose mirror image is another thing (measure it: on "
                     "MNIST, MMDC without flips lost 0.19 NMI, docs/results.md).",
                     since="987da1c", legacy=True)
    crop_sides: list[int] = key([], "Training crops: squares of one of these sides (pixels of the "
                                "stored image, clamped to its shorter side), drawn uniformly and "
                                "placed uniformly, then resized to crop_size (the MMDC code's "
                                "MNIST crops: [24, 20, 16]); empty: the random resized crop of "
                                "min_scale.", since="cd5361f", legacy=[])
    rotation_degrees: float = key(0.0, "Training images are rotated by an angle uniform in "
                                  "[-r, r] degrees about their centre (corners black) before "
                                  "the crop (the MMDC code's MNIST recipe: 25); 0: never.",
                                  bounds="[0, 180]", since="cd5361f", legacy=0.0)
    crops: list[dict[str, Any]] = key([], "Multi-crop training (SwAV, DeepCluster-v2): groups "
                                      "{size, count, scale: [min, max]}; each training batch "
                                      "then holds sum(count) views, group by group, each its "
                                      "own random resized crop of that area-fraction range "
                                      "(with the flip and rotation above) resized to size, e.g. "
                                      "[{size: 224, count: 2, scale: [0.14, 1.0]}, {size: 96, "
                                      "count: 6, scale: [0.05, 0.14]}]; empty: the one "
                                      "training crop of crop_size and min_scale.",
                                      since="ac73824", legacy=[])
    workers: int = key(2, "torchvision: decoding processes (0: the main process); dali: "
                       "threads.", bounds=">= 0", hashed=False)
    max_bad_fraction: float = key(0.01, "Fraction of unreadable images tolerated per pass "
                                  "before the run stops.", bounds="[0, 1)")
    grayscale_stats: bool = key(False, "Normalise with one mean/std, for grayscale sources.")


@dataclass
class ModelConfig:
    arch: str = key("alexnet", "The network: alexnet (BN, no LRN), vgg16 (BN), smallconv, "
                    "smallvgg (MMDC's MNIST net: 4 conv-BN-ReLU-pool blocks), resnet18/50 "
                    "(torchvision's, untrained; model.sobel applies).",
                    choices=("alexnet", "vgg16", "smallconv", "smallvgg", "resnet18", "resnet50"))
    sobel: bool = key(True, "Fixed grayscale + Sobel front end (not trained).")
    dropout: float = key(0.5, "Dropout in the fully connected classifier.", bounds="[0, 1)")
    width: int = key(64, "First channel width of smallconv and smallvgg, doubled per block "
                     "(ignored by others).",
                     bounds="> 0")
    fc_dim: int = key(4096, "Units of the fully connected layers (the feature dimension); 0: "
                      "none, the head sits on the pooled conv output (ResNet style, as MMDC "
                      "uses ResNet-18).", bounds=">= 0")
    fc_init: str = key("paper", "Linear-layer init: paper draws N(0, 0.01), which keeps the "
                       "signal's scale only for fan-ins near 10^4 (AlexNet's 9216); fan_in "
                       "draws N(0, 1/fan_in), for small models.", choices=("paper", "fan_in"))
    channels_last: str = key("auto", "NHWC images and conv weights: auto (on a GPU, where "
                             "tensor cores want it), always or never.",
                             choices=("auto", "always", "never"), since="231d085",
                             legacy="never")


@dataclass
class OptimConfig:
    lr: float = key(0.05, "Learning rate of SGD.", bounds="> 0")
    momentum: float = key(0.9, "SGD momentum.", bounds=">= 0")
    weight_decay: float = key(1e-5, "SGD weight decay.", bounds=">= 0")
    batch_size: int = key(256, "Training batch per process, when optim.global_batch is 0 "
                          "(the batch of a step then grows with the processes).", bounds="> 0")
    global_batch: int = key(0, "Training batch of a step summed over all processes, divided "
                            "equally among them (a multiple of their number), so that a preset "
                            "trains at the paper's batch and lr on 1, 8 or 32 GPUs; logged at "
                            "start. 0: optim.batch_size per process. Not hashed: a checkpoint "
                            "records the global batch it trained at, and a resume on another "
                            "number of processes keeps it or is refused.", bounds=">= 0",
                            hashed=False, since="f011279")
    lr_scaling: str = key("none", "With optim.global_batch 0: none, or linear (lr * number of "
                          "processes); the paper uses none. Must be none with a global batch, "
                          "whose lr is the lr of that batch.", choices=("none", "linear"))
    precision: str = key("fp32", "Autocast dtype of the training and feature passes: fp32 "
                         "(none), bf16, or fp16 (with loss scaling, its state in the "
                         "checkpoint).", choices=("fp32", "bf16", "fp16"), since="231d085",
                         legacy="fp32")


@dataclass
class ExtractConfig:
    batch_size: int = key(512, "Batch of the clustering feature pass, per process (no "
                          "gradients kept).", bounds="> 0", since="231d085",
                          legacy=SameAs("optim.batch_size"))


_PIC = ("clustering.method", "pic")  # PIC's keys change results only then


@dataclass
class PICConfig:
    sigma: float = key(0.2, "Bandwidth of the Gaussian edge weights.", bounds="> 0", when=_PIC)
    alpha: float = key(1e-3, "Regularisation of the power iteration.", bounds="(0, 1)",
                       when=_PIC)
    knn: int = key(5, "Neighbours per node in the graph.", bounds="> 0", when=_PIC)
    iterations: int = key(10, "Power iterations.", bounds="> 0", when=_PIC)


_BANK = ("clustering.features", "training_pass")  # the bank's keys change results only then


@dataclass
class BankConfig:
    """The feature bank of clustering.features=training_pass (dcluster/runtime/feature_bank.py)."""
    max_age: int = key(1, "A row the training passes have not rewritten for more than this "
                       "many epochs is recomputed (centre crop, eval mode) before the "
                       "clustering; 1: every image the last epoch did not draw.", bounds="> 0",
                       since="ad76a52", legacy=1, when=_BANK)
    dtype: str = key("float32", "How the rows are stored.",
                     choices=("float32", "float16", "bfloat16"), since="ad76a52",
                     legacy="float32", when=_BANK)
    momentum: float = key(0.9, "A training row blends into the row held: m * held + (1 - m) "
                          "* new (0: replaces it).", bounds="[0, 1)", since="b62a755",
                          legacy=0.0, when=_BANK)
    memory: str = key("auto", "auto: the rank's GPU if the bank and its outbox fit there, "
                      "else host memory (dcluster/parallel/memory_plan.py, logged); device: the rank's "
                      "GPU (its CPU without one); host: host memory (for a bank larger than "
                      "the GPU can spare).", choices=("auto", "device", "host"), hashed=False,
                      since="ad76a52")


@dataclass
class ClusteringConfig:
    method: str = key("kmeans", "kmeans, or pic (power iteration clustering).",
                      choices=("kmeans", "pic"))
    features: str = key("extra_pass", "extra_pass: a forward pass over every image (centre "
                        "crops, eval mode) before each clustering (the paper); training_pass: "
                        "the features the last epoch's training forward computed, kept in a "
                        "bank sharded across ranks (SwAV's DeepClusterV2).",
                        choices=("extra_pass", "training_pass"), since="ad76a52",
                        legacy="extra_pass")
    bank: BankConfig = field(default_factory=BankConfig)
    k: int = key(10000, "Number of clusters.", bounds="> 0")
    pca_dim: int = key(256, "PCA dimension before the clustering; 0 keeps the full dimension.",
                       bounds=">= 0")
    pca_sample: int = key(25000, "Rows the PCA covariance is computed from, drawn per (seed, "
                          "epoch); 0: all rows (the paper). A fixed budget bounds the cost as "
                          "N grows.", bounds=">= 0", since="629576f", legacy=0)
    whiten: bool = key(True, "Whiten the PCA output.")
    l2_normalize: bool = key(True, "L2-normalise the vectors before the clustering.")
    niter: int = key(20, "k-means iterations.", bounds="> 0")
    max_points_per_centroid: int = key(0, "k-means subsamples to this many points per "
                                       "centroid; 0: no subsampling (the paper's setting).",
                                       bounds=">= 0")
    device: str = key("auto", "Where the clustering runs: auto (the GPUs when torch sees any: "
                      "FAISS where its build has code for them, else PyTorch, see "
                      "clustering.backend; the CPU without GPUs), cpu or gpu (exit 2 when no "
                      "backend can use the GPUs).",
                      choices=("auto", "cpu", "gpu"))
    backend: str = key("auto", "What assigns rows to centroids: auto (FAISS where its build has "
                        "code for the GPUs, PyTorch on GPUs it has none for, FAISS on the CPU), "
                        "faiss or torch. The backends assign alike (tests/test_kmeans_engine.py), "
                        "so a run may resume on a node whose GPUs need the other one.",
                        choices=("auto", "faiss", "torch"), hashed=False, since="7c19a2f")
    gpus: str = key("own", "GPUs a process's k-means assigns on: own (its own device only; its "
                    "peers' GPUs hold their training state) or node (every GPU of the node: "
                    "gather mode, rank 0 clustering while its peers wait). Sharded mode always "
                    "uses the own device.", choices=("own", "node"), hashed=False,
                    since="b6e838d", legacy="node")
    every: int = key(1, "Re-cluster every n epochs, a new head each time (the paper: every "
                 "epoch).", bounds="> 0")
    mode: str = key("gather", "gather: the vectors of all ranks go to rank 0, which clusters "
                    "them (k-means or PIC); sharded: Lloyd iterations across ranks, no rank "
                    "holds more than its own shard (k-means only; for N x pca_dim floats too "
                    "large for one host, e.g. YFCC100M).", choices=("gather", "sharded"),
                    since="482ef12", legacy="gather")
    pic: PICConfig = field(default_factory=PICConfig)


@dataclass
class DistributedConfig:
    """How the processes of a multi-process job talk; the launch itself (torchrun, Slurm,
    submitit) is read from the environment (dcluster/parallel/distributed.py)."""
    backend: str = key("auto", "auto (nccl when each process has a GPU, else gloo), gloo or "
                       "nccl.", choices=("auto", "gloo", "nccl"), hashed=False, since="482ef12")
    timeout_s: float = key(1800.0, "A collective waits this long for the slowest rank before "
                           "the job fails. It must exceed the longest step one rank does while "
                           "the others wait: rank 0's k-means in gather mode (minutes at "
                           "ImageNet scale) and its checkpoint writes.", bounds="> 0",
                           hashed=False, since="482ef12")
    grad_compression: str = key("none", "DDP's gradient all-reduce: none (float32), or bf16 "
                                "(halves the bytes between nodes).", choices=("none", "bf16"),
                                since="231d085", legacy="none")


@dataclass
class CheckpointConfig:
    interval: int = key(1, "Epochs between checkpoints.", bounds="> 0", hashed=False)
    keep_last: int = key(3, "Checkpoints kept.", bounds="> 0", hashed=False)
    every_iterations: int = key(0, "Mid-epoch checkpoints as well, for epochs too long to lose "
                                "(YFCC100M): every this many training iterations; 0: off.",
                                bounds=">= 0", hashed=False, since="9c7b1a2")
    every_minutes: float = key(0.0, "Mid-epoch checkpoints every this many minutes (rank 0's "
                               "clock); 0: off.", bounds=">= 0", hashed=False, since="9c7b1a2")
    poll_every: int = key(0, "Iterations between the all-ranks agreements on a stop signal or "
                          "a timed checkpoint; a stop comes within this many iterations. 0: "
                          "auto, every iteration on the CPU (a step waits for its own work "
                          "anyway) and every 20 on a GPU (each agreement makes the host wait "
                          "for the GPU to drain its queue).", bounds=">= 0", hashed=False,
                          since="231d085")
    keep_best: str = key("", "A monitor_* metric (higher is better): the checkpoint of the "
                         "epoch with its highest value is kept as checkpoints/best.pt beside "
                         "the last keep_last; empty: none kept.",
                         choices=("", *MONITOR_METRICS), hashed=False, since="e601b38")


@dataclass
class MonitorConfig:
    """The online monitor (dcluster/evaluation/monitor.py): `eval knn` and `eval clusters` measured
    during training on the held-out labels of eval.val_path / eval.val_fraction."""
    every: int = key(0, "Measure after every n-th epoch and the last; 0: off.", bounds=">= 0",
                     hashed=False, since="e601b38")
    max_images: int = key(0, "Measure on a seeded sample of this many images of data.path "
                          "(its held-out ones scored, the others the k-NN memory), to bound "
                          "the monitor's cost on a very large set; 0: every image.",
                          bounds=">= 0", hashed=False, since="e1cd661")


@dataclass
class TrackingConfig:
    enabled: bool = key(True, "Record the run in MLflow.")
    uri: str = key("", "MLflow tracking URI; empty: sqlite:///<runs_root>/mlflow.db.",
                   hashed=False)
    experiment: str = key("dcluster", "MLflow experiment name.")
    plots: bool = key(True, "Write the plots at the end of the run.", hashed=False)


@execution_only
@dataclass
class KnnEvalConfig:
    k: int = key(20, "Neighbours (DINO's protocol).", bounds="> 0")
    temperature: float = key(0.07, "Weights exp(cosine / temperature).", bounds="> 0")


@execution_only
@dataclass
class LinearEvalConfig:
    """The linear probe of DeepCluster's section 4.3 (after Zhang et al.): a frozen conv layer,
    average-pooled to about `pooled_dim` values, BatchNorm, one linear layer, SGD."""
    layer: str = key("auto", "The frozen layer: conv1..conv5 (alexnet, vgg16, resnet18/50), "
                     "conv1..conv3 (smallconv), conv1..conv4 (smallvgg); auto: the network's "
                     "deepest (conv5, conv3, conv4). Another is refused, naming the valid ones.")
    pooled_dim: int = key(9000, "Values the layer's output is average-pooled to, about.",
                          bounds="> 0")
    epochs: int = key(90, "Epochs of the probe.", bounds="> 0")
    lr: float = key(0.01, "Cosine-annealed to 0 over the epochs.", bounds="> 0")
    momentum: float = key(0.9, "SGD momentum.", bounds=">= 0")
    weight_decay: float = key(1e-4, "SGD weight decay.", bounds=">= 0")
    batch_size: int = key(256, "Batch of the probe.", bounds="> 0")


@dataclass
class EvalConfig:
    class_kmeans: bool = key(False, "k-means with k = number of true classes on the clustering "
                             "features, scored against the classes each epoch; cheap on the "
                             "demo, a real cost on ImageNet.")
    val_path: str = key("", "`dcluster eval`: validation images from a second labelled folder "
                        "tree with the same class folders; empty: val_fraction of each class "
                        "of data.path is held out (seeded).", hashed=False)
    val_labels: str = key("", "Ground-truth file of a flat eval.val_path (ImageNet's validation "
                          "set as it ships: one folder of images): the devkit's "
                          "ILSVRC2012_validation_ground_truth.txt with its meta.mat beside it, "
                          "or a .csv of image id and class (Kaggle's LOC_val_solution.csv); "
                          "classes are data.path's class folder names (WNIDs). Empty: "
                          "eval.val_path has class folders.", hashed=False, since="5a64ea1")
    val_fraction: float = key(0.2, "Held-out fraction of each class when val_path is empty.",
                              bounds="(0, 1)", hashed=False)
    batch_size: int = key(256, "Batch of the feature passes of `dcluster eval`.", bounds="> 0",
                          hashed=False)
    knn: KnnEvalConfig = field(default_factory=KnnEvalConfig)
    linear: LinearEvalConfig = field(default_factory=LinearEvalConfig)


@execution_only
@dataclass
class SlurmConfig:
    """Cluster defaults for `dcluster submit`; a team writes them once in a YAML file, the
    command line overrides them. None of them changes what the run computes."""
    partition: str = key("", "Slurm partition.", since="482ef12")
    account: str = key("", "Slurm account.", since="482ef12")
    qos: str = key("", "Slurm QOS.", since="482ef12")
    constraint: str = key("", "Slurm node constraint.", since="482ef12")
    exclude: str = key("", "Nodes to exclude.", since="482ef12")
    nodes: int = key(1, "Nodes of the job.", bounds="> 0", since="482ef12")
    gpus_per_node: int = key(0, "One task per GPU; 0: CPU-only tasks.", bounds=">= 0",
                             since="482ef12")
    tasks_per_node: int = key(1, "Processes per node when gpus_per_node is 0.", bounds="> 0",
                              since="482ef12")
    cpus_per_task: int = key(0, "CPUs per task; 0: data.workers + 2 (the decoding workers, the "
                             "training loop, one for NCCL's and the loader's own threads).",
                             bounds=">= 0", since="482ef12")
    mem_gb: int = key(0, "Memory per node; 0: the partition's default.", bounds=">= 0",
                      since="482ef12")
    time_min: int = key(4320, "Time limit of one job, in minutes.", bounds="> 0",
                        since="482ef12")
    job_name: str = key("", "Default: the run name.", since="482ef12")
    log_dir: str = key("", "Default: <run dir>/slurm.", since="482ef12")
    max_requeues: int = key(100, "Timeouts/preemptions survived before the job gives up.",
                            bounds=">= 0", since="482ef12")
    signal_delay_s: int = key(120, "USR2 this long before the time limit: time to checkpoint.",
                              bounds=">= 0", since="482ef12")


@dataclass
class Config:
    """The keys every run has. A config is built from the schema that adds the training
    methods' sections to these (:func:`compose_schema`); code below the methods reads only
    these keys."""
    name: str = key("???", "Run name: the run directory is <runs_root>/<name>.")
    runs_root: str = key("runs", "Where run directories and the MLflow store live.",
                         hashed=False)
    seed: int = key(0, "Seeds k-means, the head's init, the sampler and the augmentations, "
                    "each per epoch.", bounds=">= 0")
    epochs: int = key(500, "Epochs of the run (raise it to train a finished run further).",
                      bounds="> 0", hashed=False)
    resume: str = key("auto", "auto (the newest valid checkpoint), never, or the path of a "
                      "checkpoint.", hashed=False)
    overwrite: bool = key(False, "Move aside a run directory that holds another config's run.",
                          hashed=False)
    threads: int = key(0, "torch intra-op threads; 0: the task's CPUs under Slurm, this "
                       "process's share of the CPUs under torchrun, else torch's default. A "
                       "warning at start names a smaller value when the machine's load leaves "
                       "fewer CPUs (threads wait for each other: tenfold slower).",
                       bounds=">= 0", hashed=False)
    progress: str = key("auto", "Progress bars: auto (on a terminal), always or never.",
                        choices=("auto", "always", "never"), hashed=False)
    # its choices and default are the methods', set by compose_schema
    method: str = key("???", "The training method.")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    # the checks across keys of each method that has some, by name, run by validate()
    method_checks: ClassVar[Mapping[str, Callable[[Config], None]]] = {}


class MethodSection(Protocol):
    """What the schema needs of a training method (a MethodSpec, dcluster/methods/spec.py):
    its name, a choice of ``method``; its config section, whose keys live under that name;
    the checks across keys that apply while it is the method."""

    @property
    def name(self) -> str: ...

    @property
    def config(self) -> Optional[type]: ...  # None: no keys of its own

    @property
    def validate(self) -> Optional[Callable[[Config], None]]: ...


# the methods' sections follow the sections every method trains with, before eval and slurm
# (what runs after or around training): the order of config.yaml and of the reference
SECTIONS_BEFORE = "eval"


def compose_schema(methods: Sequence[MethodSection], module: str) -> type:
    """The schema of a dcluster with these methods: Config's keys, ``method`` one of their
    names (the first the default), each method's section under its name. Core knows no
    method, so the module that collects them (dcluster/methods/__init__.py) composes it, and
    must bind it to the name Config (where pickle looks for the class of a config)."""
    names = tuple(method.name for method in methods)
    hints = typing.get_type_hints(Config)
    fields: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(Config):
        if f.name == SECTIONS_BEFORE:
            fields += [(method.name, method.config, field(default_factory=method.config))
                       for method in methods if method.config is not None]
        if f.name == "method":
            declared = dataclasses.replace(f.metadata["key"], choices=names)
            fields.append((f.name, str, field(default=names[0], metadata={"key": declared})))
        else:
            fields.append((f.name, hints[f.name], _copy(f)))
    checks = {method.name: method.validate for method in methods if method.validate}
    return dataclasses.make_dataclass("Config", fields, namespace={
        "__module__": module, "__doc__": Config.__doc__, "method_checks": checks})


def _copy(f: dataclasses.Field) -> Any:
    """A new field like ``f``: a Field belongs to the one dataclass that declared it."""
    if f.default_factory is not dataclasses.MISSING:
        return field(default_factory=f.default_factory, metadata=f.metadata)
    return field(default=f.default, metadata=f.metadata)


def _expected_type(name: str, schema: type) -> str:
    """The declared type of config key ``name`` ("int", "list[int]"...): OmegaConf's error
    names the enclosing node's type, or Any."""
    declared = declarations(schema).get(name)
    return declared.type if declared else "a section"


def _did_you_mean(name: str, schema: type) -> str:
    """The end of an unknown-key error: the closest declared keys, or where all are listed."""
    known = declarations(schema)
    # OmegaConf names an unknown section alone ('clustring' of 'clustring.k')
    sections = {key.rsplit(".", 1)[0] for key in known if "." in key}
    near = closest(name, [*known, *sorted(sections)])
    if near:
        return f" (did you mean {' or '.join(near)}?)"
    section = name.rsplit(".", 1)[0] if "." in name else ""
    siblings = [key for key in known if key.rsplit(".", 1)[0] == section]
    if siblings:
        return f"; the keys of {section}: {', '.join(siblings)}"
    return f"; `dcluster train --help` lists all {len(known)} keys"


def _merge(base: DictConfig, other: Any, source: str, schema: type) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as err:
        name = f"{err.full_key}" if getattr(err, "full_key", None) else str(err)
        raise ConfigError(f"{source}: unknown config key '{name}'"
                          f"{_did_you_mean(name, schema)}") from None
    except ValidationError as err:
        item = _list_item(other, str(err.full_key), schema)
        if item is not None:  # OmegaConf names a bad item of a list by its position alone
            listed = item[0].split("[")[0]
            raise ConfigError(f"{source}: config key '{item[0]}' = {item[1]!r}: must be a "
                              f"mapping ({listed} is {_expected_type(listed, schema)})") from None
        raise ConfigError(
            f"{source}: key '{err.full_key}' has value {err.value!r} of the wrong type "
            f"(expected {_expected_type(str(err.full_key), schema)})"
        ) from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {err}") from None


def _list_item(other: Any, position: str, schema: type) -> Optional[tuple[str, Any]]:
    """('data.crops[1]', its value) for an error OmegaConf names only '1': the first item at
    that position, not a mapping, of a list of mappings that ``other`` sets."""
    if not position.isdigit():
        return None
    set_keys = flatten_mapping(OmegaConf.to_container(OmegaConf.create(other)))  # type: ignore
    for name, declared in declarations(schema).items():
        value = set_keys.get(name)
        if (declared.type.startswith("list[dict") and isinstance(value, list)
                and int(position) < len(value) and not isinstance(value[int(position)], dict)):
            return f"{name}[{position}]", value[int(position)]
    return None


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (),
                check_paths: bool = True, *, schema: type) -> Config:
    """Build the config from ``schema``'s defaults (see :func:`compose_schema`), then a YAML
    preset, then ``key=value`` overrides. ``check_paths`` False leaves out the checks that the
    data folders exist, for a machine that cannot see them (`dcluster submit --dry-run` on a
    laptop): see :func:`unreachable_paths`."""
    merged = OmegaConf.structured(schema)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # YAML syntax errors come in several exception types
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        merged = _merge(merged, loaded, str(path), schema)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        merged = _merge(merged, OmegaConf.from_dotlist([item]), f"override '{item}'", schema)
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"required config key(s) not set: {', '.join(missing)}")
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg, check_paths)
    return cfg


def check_key(condition: bool, key: str, value: Any, why: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}' = {value!r}: {why}")


def unreachable_paths(cfg: Config) -> list[tuple[str, str]]:
    """The data folders (and ground-truth file) of the config that do not exist here, as
    (key, path)."""
    folders = [("data.path", cfg.data.path)]
    if cfg.eval.val_path:
        folders.append(("eval.val_path", cfg.eval.val_path))
    missing = [(name, path) for name, path in folders if not Path(path).is_dir()]
    if cfg.eval.val_labels and not Path(cfg.eval.val_labels).is_file():
        missing.append(("eval.val_labels", cfg.eval.val_labels))
    return missing


def validate(cfg: Config, check_paths: bool = True) -> None:
    """Reject values that would fail (or silently mislead) hours into a run: each key's own
    choices and bounds (declared beside its field), then the checks across keys (the method's
    own among them, see :func:`compose_schema`), then (with ``check_paths``) that the data
    folders exist."""
    declared = declarations(type(cfg))
    for name, value in flatten(cfg).items():
        problem = declared[name].key.problem(value)
        check_key(problem is None, name, value, problem or "")
    check_key(cfg.clustering.pca_sample == 0
              or cfg.clustering.pca_sample > cfg.clustering.pca_dim,
              "clustering.pca_sample", cfg.clustering.pca_sample,
              f"must be 0 (all rows) or more than clustering.pca_dim ({cfg.clustering.pca_dim}) "
              "rows, or the covariance cannot have pca_dim directions")
    check_key(cfg.optim.global_batch == 0 or cfg.optim.lr_scaling == "none", "optim.lr_scaling",
              cfg.optim.lr_scaling, "must be none with optim.global_batch: optim.lr is the lr "
              "of that global batch on any number of processes")
    check_key(all(side > 0 for side in cfg.data.crop_sides), "data.crop_sides",
              cfg.data.crop_sides, "must hold positive sides in pixels")
    validate_crops(cfg.data)
    check_key(cfg.data.resize_size >= cfg.data.crop_size, "data.resize_size",
           cfg.data.resize_size, f"must be at least data.crop_size ({cfg.data.crop_size})")
    check_key(bool(cfg.name) and "/" not in cfg.name and cfg.name not in (".", ".."), "name",
           cfg.name, "must be a plain directory name")
    if cfg.clustering.mode == "sharded":
        validate_sharded(cfg)
    validate_monitor(cfg)
    method_check = type(cfg).method_checks.get(cfg.method)
    if method_check is not None:
        method_check(cfg)
    check_key(not cfg.eval.val_labels or bool(cfg.eval.val_path), "eval.val_labels",
              cfg.eval.val_labels, "labels the images of eval.val_path: set it too")
    check_key(cfg.slurm.signal_delay_s < cfg.slurm.time_min * 60, "slurm.signal_delay_s",
              cfg.slurm.signal_delay_s, f"must be shorter than slurm.time_min "
              f"({cfg.slurm.time_min} min), or the job is signalled before it starts")
    if check_paths:
        for name, path in unreachable_paths(cfg):
            check_key(False, name, path, "does not exist (or is not a "
                      f"{'file' if name == 'eval.val_labels' else 'directory'})")


CROP_GROUP_FIELDS = ("size", "count", "scale")


def validate_crops(data: DataConfig) -> None:
    """Each group of data.crops: {size >= 1, count >= 1, scale: [min, max]} with
    0 < min <= max <= 1, each problem named by its key (data.crops[1].scale)."""
    for number, group in enumerate(data.crops):
        name = f"data.crops[{number}]"
        check_key(isinstance(group, dict) and set(group) == set(CROP_GROUP_FIELDS), name, group,
                  "must be a mapping of exactly size, count and scale "
                  "({size: 96, count: 6, scale: [0.05, 0.14]})")
        for field_name in ("size", "count"):
            value = group[field_name]
            check_key(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                      f"{name}.{field_name}", value, "must be an integer of at least 1")
        scale = group["scale"]
        check_key(isinstance(scale, (list, tuple)) and len(scale) == 2
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale)
                  and 0 < scale[0] <= scale[1] <= 1, f"{name}.scale", scale,
                  "must be [min, max] area fractions with 0 < min <= max <= 1")
    check_key(not data.crops or not data.crop_sides, "data.crops", data.crops,
              "groups are random resized crops of their scale: leave data.crop_sides empty")


def validate_sharded(cfg: Config) -> None:
    """Sharded clustering is Lloyd's k-means over all points of all ranks: PIC needs the whole
    neighbour graph in one place, and subsampling would need a distributed draw it does not do."""
    check_key(cfg.clustering.method == "kmeans", "clustering.method", cfg.clustering.method,
           "clustering.mode=sharded runs k-means only; use clustering.mode=gather for PIC")
    check_key(cfg.clustering.max_points_per_centroid == 0, "clustering.max_points_per_centroid",
           cfg.clustering.max_points_per_centroid,
           "clustering.mode=sharded trains on every point: set it to 0")


def validate_monitor(cfg: Config) -> None:
    """checkpoint.keep_best needs measured epochs that end at checkpoints."""
    best = cfg.checkpoint.keep_best
    if not best:
        return
    check_key(cfg.monitor.every > 0, "checkpoint.keep_best", best,
              "needs the monitor: set monitor.every")
    # every measured epoch must end at a checkpoint, or the best one might have none
    check_key(cfg.monitor.every % cfg.checkpoint.interval == 0, "monitor.every",
              cfg.monitor.every, f"must be a multiple of checkpoint.interval "
              f"({cfg.checkpoint.interval}) with checkpoint.keep_best")


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


def keys_in_yaml_file(path: Path, schema: type) -> dict[str, Any]:
    """The keys a YAML config file sets, typed as ``schema`` declares them: a run directory's
    config.yaml written by an older dcluster lacks the keys added since (they are not read
    as today's defaults, see dcluster/core/config_settings.py)."""
    loaded = OmegaConf.load(path)
    typed = flatten(OmegaConf.to_object(_merge(OmegaConf.structured(schema), loaded,
                                                str(path), schema)))  # type: ignore[arg-type]
    present = flatten_mapping(OmegaConf.to_container(loaded))  # type: ignore[arg-type]
    return {name: typed[name] for name in present}


def flatten_mapping(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {'a.b': value}."""
    out: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten_mapping(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out

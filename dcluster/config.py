"""The typed configuration schema, YAML loading with ``key=value`` overrides, and validation.

Every value a run depends on lives here so that a mistyped key or an impossible value is
rejected before any image is read: a bad config caught at start-up costs seconds, one caught
after the first feature pass costs hours on ImageNet.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A configuration problem, with the offending key and value in the message."""


@dataclass
class DataConfig:
    path: str = "???"  # root of the image folder tree (class folders or a flat folder)
    loader: str = "torchvision"
    crop_size: int = 224  # side of the centre crop (feature pass) and random crop (training)
    resize_size: int = 256  # shorter side before the centre crop of the feature pass
    min_scale: float = 0.08  # lower bound of the random-resized-crop area fraction
    workers: int = 2  # decoding worker processes; 0 decodes in the main process
    max_bad_fraction: float = 0.01  # unreadable images tolerated before the run stops
    grayscale_stats: bool = False  # normalise with one mean/std for grayscale sources


@dataclass
class ModelConfig:
    arch: str = "alexnet"  # alexnet | vgg16 | smallconv
    sobel: bool = True  # fixed grayscale + Sobel front end (not trained)
    dropout: float = 0.5  # in the fully connected classifier
    width: int = 64  # channel width of the smallconv demo model (ignored by others)
    fc_dim: int = 4096  # units of the fully connected layers (the feature dimension)


@dataclass
class OptimConfig:
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-5
    batch_size: int = 256  # per process
    lr_scaling: str = "none"  # none | linear (lr * world_size); the paper uses none


@dataclass
class PICConfig:
    sigma: float = 0.2  # bandwidth of the Gaussian edge weights
    alpha: float = 1e-3  # regularisation of the power iteration
    knn: int = 5  # neighbours per node in the graph
    iterations: int = 10  # power iterations


@dataclass
class ClusteringConfig:
    method: str = "kmeans"  # kmeans | pic
    k: int = 10000
    pca_dim: int = 256  # 0 keeps the full dimension
    whiten: bool = True
    l2_normalize: bool = True
    niter: int = 20  # k-means iterations
    max_points_per_centroid: int = 0  # 0 means no subsampling (the paper's setting)
    device: str = "auto"  # auto | cpu | gpu
    every: int = 1  # re-cluster every n epochs (the paper: every epoch)
    pic: PICConfig = field(default_factory=PICConfig)


@dataclass
class CheckpointConfig:
    interval: int = 1  # epochs between checkpoints
    keep_last: int = 3


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # empty: sqlite:///<runs_root>/mlflow.db
    experiment: str = "dcluster"
    plots: bool = True


@dataclass
class EvalConfig:
    # k-means with k = number of true classes on the clustering features, scored against the
    # classes each epoch; cheap on the demo, a real cost on ImageNet.
    class_kmeans: bool = False


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
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_CHOICES: dict[str, tuple[str, ...]] = {
    "data.loader": ("torchvision",),
    "model.arch": ("alexnet", "vgg16", "smallconv"),
    "optim.lr_scaling": ("none", "linear"),
    "clustering.method": ("kmeans", "pic"),
    "clustering.device": ("auto", "cpu", "gpu"),
    "progress": ("auto", "always", "never"),
}

# Keys whose value changes what the run computes. A run directory refuses to resume under a
# config that differs in any other key than these, which only change how it is executed.
EXECUTION_ONLY_KEYS = frozenset(
    {"epochs", "resume", "overwrite", "threads", "progress", "data.workers", "tracking.uri",
     "tracking.plots", "checkpoint.keep_last", "checkpoint.interval", "data.path", "runs_root"}
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
            f"(expected {getattr(err.ref_type, '__name__', err.ref_type)})"
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


def _check(condition: bool, key: str, value: Any, why: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}' = {value!r}: {why}")


def validate(cfg: Config) -> None:
    """Reject values that would fail (or silently mislead) hours into a run."""
    flat = flatten(cfg)
    for key, choices in _CHOICES.items():
        _check(flat[key] in choices, key, flat[key], f"must be one of {', '.join(choices)}")
    for key in ("epochs", "optim.batch_size", "clustering.k", "clustering.niter",
                "clustering.every", "checkpoint.interval", "checkpoint.keep_last",
                "data.crop_size", "data.resize_size", "clustering.pic.knn",
                "clustering.pic.iterations", "model.width", "model.fc_dim"):
        _check(flat[key] > 0, key, flat[key], "must be positive")
    for key in ("optim.lr", "clustering.pic.sigma"):
        _check(flat[key] > 0, key, flat[key], "must be positive")
    for key in ("optim.momentum", "optim.weight_decay", "data.workers", "threads",
                "clustering.pca_dim", "clustering.max_points_per_centroid", "seed"):
        _check(flat[key] >= 0, key, flat[key], "must not be negative")
    _check(0.0 <= cfg.model.dropout < 1.0, "model.dropout", cfg.model.dropout, "must be in [0, 1)")
    _check(0.0 < cfg.data.min_scale <= 1.0, "data.min_scale", cfg.data.min_scale,
           "must be in (0, 1]")
    _check(0.0 <= cfg.data.max_bad_fraction < 1.0, "data.max_bad_fraction",
           cfg.data.max_bad_fraction, "must be in [0, 1)")
    _check(0.0 < cfg.clustering.pic.alpha < 1.0, "clustering.pic.alpha",
           cfg.clustering.pic.alpha, "must be in (0, 1)")
    _check(cfg.data.resize_size >= cfg.data.crop_size, "data.resize_size",
           cfg.data.resize_size, f"must be at least data.crop_size ({cfg.data.crop_size})")
    _check(bool(cfg.name) and "/" not in cfg.name and cfg.name not in (".", ".."), "name",
           cfg.name, "must be a plain directory name")
    data_path = Path(cfg.data.path)
    _check(data_path.is_dir(), "data.path", cfg.data.path, "is not an existing directory")


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

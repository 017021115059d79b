"""What `dcluster eval` is pointed at: a run directory (its newest valid checkpoint), one
checkpoint file (inside a run directory), or a YAML config (the network as initialised: the
random-init baseline). The config is the run's own config.yaml, so the data path, crop sizes
and model match training; ``key=value`` overrides apply on top (eval.*, data.path, ...)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from dcluster.runtime.checkpoint import CheckpointError, load_checkpoint, load_latest
from dcluster.core.config import Config, ConfigError, flatten, load_config
from dcluster.evaluation.network import NetworkRecipe, describe_network
from dcluster.runtime.run_state import upgraded

CONFIG_SUFFIXES = (".yaml", ".yml")
# the keys that shape a trained network's weights besides model.* and the method's own (its
# recipe's network_keys): an override of one of them asks for a network the checkpoint does
# not hold
NETWORK_KEYS = ("method", "data.crop_size")


@dataclass
class EvalTarget:
    cfg: Config
    payload: Optional[dict[str, Any]]  # None: the untrained network
    checkpoint: Optional[Path]
    run_dir: Optional[Path]

    @property
    def epoch(self) -> int:
        """Training epochs behind the weights (0 for the untrained network)."""
        return int(self.payload["epoch"]) if self.payload is not None else 0

    @property
    def mlflow_run_id(self) -> Optional[str]:
        return self.payload.get("mlflow_run_id") if self.payload is not None else None

    def describe(self) -> str:
        if self.checkpoint is None:
            return f"{self.cfg.name}, random init (seed {self.cfg.seed})"
        return f"{self.checkpoint} (epoch {self.epoch})"

    def default_output(self, name: str) -> Path:
        """<run dir>/eval/<name>_eNNNNNN.json, or under <runs_root>/eval/ for an untrained
        network (there is no run directory to put it in)."""
        folder = (self.run_dir / "eval" if self.run_dir is not None
                  else Path(self.cfg.runs_root) / "eval" / f"{self.cfg.name}-random-init")
        return folder / f"{name}_e{self.epoch:06d}.json"


def resolve_target(target: str | Path, overrides: Sequence[str],
                   recipes: Mapping[str, NetworkRecipe], schema: type) -> EvalTarget:
    """Read the target's config and checkpoint; every error names the path. ``recipes``: the
    methods' networks by name, which overrides of a checkpoint's config may not change;
    ``schema``: the config schema with the methods' sections (dcluster.methods.Config)."""
    path = Path(target)
    if path.suffix in CONFIG_SUFFIXES and path.is_file():
        return EvalTarget(load_config(path, overrides, schema=schema), None, None, None)
    if path.is_dir():
        run_dir = path
        found = load_latest(run_dir / "checkpoints")
        if found is None:
            raise CheckpointError(f"run directory {run_dir}: no valid checkpoint in "
                                  f"{run_dir / 'checkpoints'}")
        payload, checkpoint = found
    elif path.is_file():
        payload, checkpoint = load_checkpoint(path), path
        run_dir = path.parent.parent  # <run dir>/checkpoints/<file>
    else:
        raise ConfigError(f"eval target {path}: no such run directory, checkpoint or "
                          f"{'/'.join(CONFIG_SUFFIXES)} config file")
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"eval target {path}: {config} is missing, so the network and data "
                          "of this checkpoint are unknown (is it inside a run directory?)")
    # the store and run directory are where the run is now, wherever it was trained from
    here = f"runs_root={run_dir.parent}"
    cfg = load_config(config, [here, *overrides], schema=schema)
    check_same_network(load_config(config, [here], schema=schema), cfg, checkpoint,
                       recipes[cfg.method])
    return EvalTarget(cfg, upgraded(payload), checkpoint, run_dir)


def network_settings(cfg: Config, recipe: NetworkRecipe) -> dict[str, Any]:
    """What a checkpoint's weights depend on: the model.* keys, NETWORK_KEYS and those the
    method declares."""
    keys = (*NETWORK_KEYS, *recipe.network_keys)
    return {key: value for key, value in flatten(cfg).items()
            if key.startswith("model.") or key in keys}


def check_same_network(trained: Config, asked: Config, checkpoint: Path,
                       recipe: NetworkRecipe) -> None:
    """Refuse overrides that ask for another network than the checkpoint holds, naming both
    (the alternative is load_state_dict's size-mismatch traceback)."""
    held, asked_keys = network_settings(trained, recipe), flatten(asked)
    wanted = {key: asked_keys[key] for key in held}
    changed = [key for key in held if held[key] != wanted[key]]
    if changed:
        raise ConfigError(
            f"eval target {checkpoint}: holds a {describe_network(trained)} network, the "
            f"overrides ask for {', '.join(f'{k}={wanted[k]!r}' for k in changed)} "
            f"(trained with {', '.join(f'{k}={held[k]!r}' for k in changed)}); "
            "drop those overrides")

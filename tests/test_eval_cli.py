"""`dcluster eval` end to end on small runs of the demo digits: run directories, checkpoint
files and configs as targets, the JSON file, the MLflow record nested under the training run,
and errors that name the key before any image is read."""
import argparse
import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from dcluster.runtime.checkpoint import CheckpointError
from dcluster.core.config import ConfigError
from dcluster.evaluation.cli import add_parser
from dcluster.evaluation.protocols import evaluate
from dcluster.methods import METHODS, Config, load_config
from dcluster.core.logs import configure_logging
from dcluster.train import train
from dcluster.reporting.mlflow_store import tracking_uri
from helpers import TINY_MMDC

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = [*TINY_MMDC, "optim.batch_size=128", "eval.batch_size=128", "tracking.plots=false"]


@pytest.fixture(scope="module")
def runs(digits_subset, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def mmdc_run(digits_subset, runs):
    """One MMDC epoch, tracked in MLflow."""
    configure_logging()
    return train(load_config(CONFIGS / "mmdc_demo.yaml", [
        f"data.path={digits_subset}", f"runs_root={runs}", "epochs=1", "mmdc.refine_epochs=0",
        *TINY]))


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="dcluster")
    add_parser(parser.add_subparsers(dest="command", required=True), METHODS, Config)
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_clusters_of_a_run_go_to_json_and_to_a_run_nested_in_mlflow(mmdc_run):
    result, path = evaluate("clusters", mmdc_run.run_dir, METHODS, Config)
    assert path == mmdc_run.run_dir / "eval" / "clusters_e000001.json"
    record = json.loads(path.read_text())
    assert record["epoch"] == 1 and record["method"] == "mmdc" and record["settings"]["k"] == 10
    assert {"nmi", "acc", "head_nmi", "head_acc", "embed_nmi", "embed_acc"
            } == record["metrics"].keys()
    assert all(0.0 <= v <= 1.0 for v in record["metrics"].values())

    client = MlflowClient(tracking_uri(result.target.cfg))
    parent = client.get_run(mmdc_run.mlflow_run_id)
    nested = client.search_runs([parent.info.experiment_id],
                                f"tags.mlflow.parentRunId = '{mmdc_run.mlflow_run_id}'")
    assert len(nested) == 1 and nested[0].data.tags["dcluster.eval"] == "clusters"
    assert nested[0].data.metrics["nmi"] == pytest.approx(record["metrics"]["nmi"])
    assert [a.path for a in client.list_artifacts(nested[0].info.run_id)] == [path.name]
    beside = client.get_metric_history(mmdc_run.mlflow_run_id, "eval_clusters_nmi")
    assert [m.step for m in beside] == [1]  # on the training run, at the checkpoint's epoch


def test_knn_on_a_checkpoint_file_and_linear_probe_via_the_cli(mmdc_run, tmp_path, capsys):
    assert run_cli("eval", "knn", str(mmdc_run.checkpoint), "tracking.enabled=false") == 0
    out = capsys.readouterr().out
    assert "eval knn" in out and "top1" in out and "k=20" in out
    assert (mmdc_run.run_dir / "eval" / "knn_e000001.json").is_file()

    target = tmp_path / "probe.json"
    assert run_cli("eval", "linear", str(mmdc_run.run_dir), "eval.linear.layer=conv2",
                   "eval.linear.epochs=2", "tracking.enabled=false", "--out", str(target)) == 0
    record = json.loads(target.read_text())
    assert record["protocol"] == "linear_conv2" and record["settings"]["epochs"] == 2
    assert 0.0 <= record["metrics"]["top1"] <= record["metrics"]["top5"] <= 1.0


def test_a_config_evaluates_the_untrained_network(digits_subset, runs):
    result, path = evaluate("knn", CONFIGS / "demo.yaml", METHODS, Config, [
        f"data.path={digits_subset}", f"runs_root={runs}", "tracking.enabled=false", *TINY])
    assert result.target.epoch == 0 and "random init" in result.target.describe()
    assert path == runs / "eval" / "demo-random-init" / "knn_e000000.json"


def test_a_deepcluster_checkpoint_is_read_with_its_head(digits_subset, runs):
    run = train(load_config(CONFIGS / "demo.yaml", [
        f"data.path={digits_subset}", f"runs_root={runs}", "name=dc", "epochs=1",
        "clustering.k=20", "clustering.pca_dim=8", "tracking.enabled=false", *TINY]))
    result, _ = evaluate("clusters", run.checkpoint, METHODS, Config)
    assert result.target.cfg.method == "deepcluster" and result.metrics.keys() == {"nmi", "acc"}


@pytest.mark.parametrize("protocol, overrides, names", [
    ("linear", ["eval.linear.layer=conv9"], ["eval.linear.layer", "conv9", "conv3"]),
    ("knn", ["eval.val_fraction=1.5"], ["eval.val_fraction"]),
])
def test_bad_settings_are_named_before_any_image_is_read(mmdc_run, protocol, overrides, names):
    with pytest.raises(ConfigError) as err:
        evaluate(protocol, mmdc_run.run_dir, METHODS, Config, overrides)
    assert all(name in str(err.value) for name in names)


def test_targets_without_labels_or_checkpoints_are_refused(mmdc_run, digits_subset, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.jpg").write_bytes(next(digits_subset.glob("0/*.jpg")).read_bytes())
    with pytest.raises(ConfigError, match="data.path.*class folders"):
        evaluate("clusters", mmdc_run.run_dir, METHODS, Config, [f"data.path={flat}"])
    with pytest.raises(ConfigError, match="no such run directory"):
        evaluate("knn", tmp_path / "nowhere", METHODS, Config)
    empty = tmp_path / "run"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        evaluate("knn", empty, METHODS, Config)



def test_linear_picks_the_networks_deepest_layer_or_refuses_naming_the_valid_ones(mmdc_run):
    """The demo's smallconv has conv1..conv3: the default must not ask for conv5."""
    result, path = evaluate("linear", mmdc_run.run_dir, METHODS, Config,
                            ["eval.linear.epochs=1", "tracking.enabled=false"])
    assert path == mmdc_run.run_dir / "eval" / "linear_conv3_e000001.json"
    assert json.loads(path.read_text())["settings"]["layer"] == "conv3"
    with pytest.raises(ConfigError, match="'eval.linear.layer' = 'conv5'.*conv1, conv2, conv3"):
        evaluate("linear", mmdc_run.run_dir, METHODS, Config,
                 ["eval.linear.layer=conv5", "tracking.enabled=false"])

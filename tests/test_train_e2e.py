"""DeepCluster end to end on the demo digits: a real run directory, checkpoints, assignments,
MLflow records; and a resumed run that ends with the same weights as an uninterrupted one."""
import shutil

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from dcluster.clustering.backend import Backend
from dcluster.runtime.checkpoint import load_checkpoint, save_checkpoint
from dcluster.cli import main
from dcluster.methods import load_config
from dcluster.train import train
from helpers import SMALL_DEMO, assert_same_weights, small_demo


def final_weights(result) -> dict[str, torch.Tensor]:
    return load_checkpoint(result.checkpoint)["model"]


@pytest.fixture(scope="module")
def straight(demo_digits, tmp_path_factory):
    """The 3-epoch run never interrupted, that the resumed runs are compared with."""
    return train(small_demo(demo_digits, tmp_path_factory.mktemp("straight"), "name=straight",
                            "epochs=3"))


def test_two_epochs_end_to_end(small_demo_config, monkeypatch):
    cfg = small_demo_config()
    chosen, given = record_kmeans_backends(monkeypatch)
    result = train(cfg)
    # the hardware and FAISS's build detected once, when the method was built, and that
    # Backend given to every clustering of the run
    assert len(chosen) == 1 and len(given) == 2
    assert all(backend is chosen[0] for backend in given)
    assert [h["epoch"] for h in result.history] == [1.0, 2.0]
    for h in result.history:
        assert np.isfinite(h["loss"]) and 0.0 <= h["nmi_classes"] <= 1.0
        assert h["time_features"] > 0 and h["time_clustering"] > 0 and h["time_training"] > 0
    assert "nmi_prev" in result.history[1] and "nmi_prev" not in result.history[0]
    run = result.run_dir
    assert (run / "config.yaml").is_file() and (run / "train.log").stat().st_size > 0
    labels = np.load(run / "assignments" / "epoch_000002.npy")
    assert labels.shape == (1797,) and labels.min() >= 0 and labels.max() < 10
    payload = load_checkpoint(result.checkpoint)
    assert payload["epoch"] == 2 and np.array_equal(payload["clusters"]["labels"], labels)
    mlflow_run = MlflowClient(result.mlflow_uri).get_run(result.mlflow_run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["clustering.k"] == "10"
    assert {"loss", "nmi_classes", "nmi_prev", "objective"} <= mlflow_run.data.metrics.keys()
    assert (run / "plots" / "nmi_curves.png").stat().st_size > 0


def record_kmeans_backends(monkeypatch) -> tuple[list[Backend], list[Backend]]:
    """The Backends DeepCluster chooses (machine_backend) and those its clusterings get."""
    import dcluster.methods.deepcluster.method as method

    chosen: list[Backend] = []
    given: list[Backend] = []
    machine_backend, kmeans = method.machine_backend, method.kmeans

    def choosing(*args):
        chosen.append(machine_backend(*args))
        return chosen[-1]

    def clustering(x, cfg, comm, seed, device, backend):
        given.append(backend)
        return kmeans(x, cfg, comm, seed, device, backend)

    monkeypatch.setattr(method, "machine_backend", choosing)
    monkeypatch.setattr(method, "kmeans", clustering)
    return chosen, given


def test_resume_reproduces_the_uninterrupted_run(small_demo_config, straight):
    # the same run, stopped after 2 epochs and continued by a second `train` call
    train(small_demo_config("name=resumed", "epochs=2"))
    resumed = train(small_demo_config("name=resumed", "epochs=3"))
    assert_same_weights(final_weights(straight), final_weights(resumed))
    assert resumed.mlflow_run_id is not None
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    client = MlflowClient(resumed.mlflow_uri)
    losses = client.get_metric_history(resumed.mlflow_run_id, "loss")
    assert sorted(m.step for m in losses) == [1, 2, 3]  # one MLflow run across both sessions


def test_corrupt_newest_checkpoint_falls_back_and_still_matches(small_demo_config, straight):
    interrupted = train(small_demo_config("name=broken", "epochs=2"))
    newest = interrupted.checkpoint
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    resumed = train(small_demo_config("name=broken", "epochs=3"))
    assert newest.name in (resumed.run_dir / "train.log").read_text()  # reported
    assert_same_weights(final_weights(straight), final_weights(resumed))


def test_cli_reports_a_bad_key_without_traceback(demo_digits, tmp_path, capsys):
    code = main(["train", "configs/demo.yaml", f"data.path={demo_digits}",
                 f"runs_root={tmp_path}", "clustering.kk=3"])
    err = capsys.readouterr().err
    assert code == 2 and "clustering.kk" in err and "Traceback" not in err


def test_cli_refuses_a_run_dir_of_another_config(small_demo_config, demo_digits, tmp_path, capsys):
    train(small_demo_config("epochs=1"))
    code = main(["train", "configs/demo.yaml", f"data.path={demo_digits}",
                 f"runs_root={tmp_path / 'runs'}", *SMALL_DEMO, "clustering.k=12", "epochs=1"])
    err = capsys.readouterr().err
    assert code == 2 and "clustering.k: 10 -> 12" in err


def test_cli_info_names_the_code_paths(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "faiss" in out and "k-means backend" in out and "k-NN backend" in out and "torch" in out


def test_a_format_2_checkpoint_resumes_to_the_same_weights(straight, tmp_path):
    """Checkpoints written before the run harness (format 2: labels and the head's optimiser
    as top-level entries) are read through run_state.upgraded: the uninterrupted run's epoch-2
    checkpoint, rewritten in format 2 in a copy of its run, resumes to its final weights."""
    run = tmp_path / "runs" / "straight"
    shutil.copytree(straight.run_dir, run)
    checkpoints = run / "checkpoints"
    for name in ("ckpt_e000003_i0000000.pt", "ckpt_e000003_i0000000.pt.sha256"):
        (checkpoints / name).unlink()
    payload = load_checkpoint(checkpoints / "ckpt_e000002_i0000000.pt")
    clusters = payload.pop("clusters")
    old = {key: value for key, value in payload.items() if key not in ("head", "method")}
    old.update(format=2, labels=clusters["labels"], previous_labels=clusters["previous_labels"],
               n_clusters=clusters["n_clusters"], head_optimizer=payload["head"]["optimizer"],
               history=[dict(h, epoch=h["epoch"] - 1) for h in payload["history"]])  # from 0
    save_checkpoint(checkpoints, old, epoch=2)
    cfg = load_config(run / "config.yaml", [f"runs_root={tmp_path / 'runs'}"])
    resumed = train(cfg)
    assert [h["epoch"] for h in resumed.history] == [1.0, 2.0, 3.0]
    assert_same_weights(final_weights(straight), final_weights(resumed))


def test_a_format_4_mid_epoch_checkpoint_resumes_to_the_same_weights(straight, small_demo_config):
    """Mid-epoch checkpoints written before the harness owned the epoch's stages (format 4:
    the in-epoch entry carries the method's own "extra" facts) resume through
    run_state.upgraded, the harness skipping the stages they had finished: a checkpoint from
    inside epoch 3's training pass, rewritten in format 4, resumes to the uninterrupted run's
    final weights."""
    periodic = train(small_demo_config("name=periodic", "epochs=3",
                                       "checkpoint.every_iterations=5",
                                       "checkpoint.keep_last=1000"))
    checkpoints = periodic.run_dir / "checkpoints"
    inside = sorted(checkpoints.glob("ckpt_e000002_i*.pt"))[1:]  # epoch 3's mid-epoch ones
    path = inside[len(inside) // 2]
    payload = load_checkpoint(path)
    assert payload["in_epoch"]["stage"] == 0 and payload["in_epoch"]["ranks"][0]["progress"][
        "position"] > 0
    old = dict(payload, format=4,
               in_epoch={**payload["in_epoch"], "extra": {"reclustered": True}})
    save_checkpoint(checkpoints, old, epoch=2, iteration=payload["iteration"])  # newer set aside
    resumed = train(small_demo_config("name=periodic", "epochs=3"))
    assert resumed.history[-1]["epoch"] == 3.0
    assert_same_weights(final_weights(straight), final_weights(resumed))

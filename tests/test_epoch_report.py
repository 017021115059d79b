"""The epoch's one log line: numbered from 1, says which network its scores measure, and
prints only what the method measured."""
from dcluster.epoch_report import format_epoch_line

TIMES = {"time_features": 1.0, "time_clustering": 0.5, "time_training": 3.0}


def test_deepcluster_scores_are_of_the_features_the_epoch_started_with() -> None:
    line = format_epoch_line(0, 30, {"loss": 2.5, "nmi_classes": 0.5, "probe_nmi": 0.4, **TIMES},
                             "start")
    assert line.startswith("epoch 1/30 | loss 2.5000 | ")
    assert "| start-of-epoch features: NMI(classes) 0.500 kmeans-C NMI 0.400 |" in line


def test_mmdc_without_the_rotation_task_prints_no_rotation_loss() -> None:
    metrics = {"loss": 0.1, "moved_fraction": 0.25, "nmi_classes": 0.7, **TIMES}
    line = format_epoch_line(11, 12, metrics, "end")
    assert "rotation" not in line and "nan" not in line
    assert "epoch 12/12" in line and "end-of-epoch features: NMI(classes) 0.700" in line
    with_rotation = format_epoch_line(11, 12, {**metrics, "loss_rotation": 1.2}, "end")
    assert "rotation loss 1.2000" in with_rotation

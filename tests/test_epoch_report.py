"""The epoch's one log line: numbered from 1, says which network its scores measure, and
prints only what the method measured, from the method's declarations (metric_spec.Metric)."""
from dcluster.methods.deepcluster.method import DeepCluster
from dcluster.reporting.epoch_report import format_epoch_line
from dcluster.core.metric_spec import Metric
from dcluster.methods.mmdc.method import MMDC

TIMES = {"time_features": 1.0, "time_clustering": 0.5, "time_training": 3.0}


def test_deepcluster_scores_are_of_the_features_the_epoch_started_with() -> None:
    line = format_epoch_line(0, 30, {"loss": 2.5, "nmi_classes": 0.5, "probe_nmi": 0.4, **TIMES},
                             DeepCluster.metrics, "start-of-epoch features")
    assert line.startswith("epoch 1/30 | loss 2.5000 | ")
    assert "| start-of-epoch features: NMI(classes) 0.500 kmeans-C NMI 0.400 |" in line


def test_mmdc_without_the_rotation_task_prints_no_rotation_loss() -> None:
    metrics = {"loss": 0.1, "moved_fraction": 0.25, "nmi_classes": 0.7, **TIMES}
    line = format_epoch_line(11, 12, metrics, MMDC.metrics, MMDC.scored_at)
    assert "rotation" not in line and "nan" not in line
    assert "epoch 12/12" in line and "end-of-epoch features: NMI(classes) 0.700" in line
    with_rotation = format_epoch_line(11, 12, {**metrics, "loss_rotation": 1.2}, MMDC.metrics,
                                      MMDC.scored_at)
    assert "rotation loss 1.2000" in with_rotation


def test_the_lines_are_those_the_methods_printed_before_they_declared_their_metrics() -> None:
    """Users and tests parse the line: the declarations reproduce it character for character
    (the expected strings were printed by the code before the declarations, commit 0dd45d7)."""
    deepcluster = {"loss": 2.5, "objective": 12345.678, "nmi_prev": 0.61, "nmi_classes": 0.5,
                   "acc_classes": 0.45, "probe_nmi": 0.4, "probe_acc": 0.3,
                   "monitor_knn_top1": 0.7, "monitor_kmeans_nmi": 0.6, "monitor_kmeans_acc": 0.55,
                   "n_empty": 3.0, "n_reseeded": 2.0, "bank_refreshed": 0.125,
                   "time_monitor": 0.25, "speed_train_img_s": 100.0, "speed_data_wait": 0.1,
                   **TIMES}
    assert format_epoch_line(4, 30, deepcluster, DeepCluster.metrics, "training-pass features") == (
        "epoch 5/30 | loss 2.5000 | objective 1.235e+04 | training-pass features: NMI(prev) 0.610 "
        "NMI(classes) 0.500 ACC(classes) 0.450 kmeans-C NMI 0.400 kmeans-C ACC 0.300 | monitor "
        "(end of epoch): kNN top1 0.700 k-means NMI 0.600 ACC 0.550 | empty 3 (reseeded 2) | "
        "bank refreshed 12% | time features 1.0s clustering 0.5s training 3.0s monitor 0.2s | "
        "training 100 img/s (data wait 10%)")
    mmdc = {"loss": 0.1, "loss_rotation": 1.2, "moved_fraction": 0.2545, "nmi_classes": 0.7,
            "clusters_empty": 4.0, "lr": 0.1, **TIMES}
    assert format_epoch_line(11, 12, mmdc, MMDC.metrics, MMDC.scored_at) == (
        "epoch 12/12 | loss 0.1000 | rotation loss 1.2000 | targets moved 25.4% | "
        "end-of-epoch features: NMI(classes) 0.700 | empty 4 | time features 1.0s "
        "clustering 0.5s training 3.0s")


def test_a_new_method_prints_its_values_by_declaring_them() -> None:
    declared = (Metric("temperature", "temperature {temperature:.2f}"),
                Metric("purity", "purity {purity:.3f}", "scores", higher_is_better=True))
    line = format_epoch_line(0, 2, {"loss": 1.0, "temperature": 0.5, "purity": 0.25,
                                    "time_training": 2.0}, declared, "its own features")
    assert line == ("epoch 1/2 | loss 1.0000 | temperature 0.50 | its own features: purity 0.250 "
                    "| time features 0.0s clustering 0.0s training 2.0s")

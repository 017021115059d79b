"""DeepCluster (Caron et al., ECCV 2018, section 3) on the run harness. One epoch, top to bottom (stages()):

    features of my shard -> PCA/whiten/L2 -> k-means across ranks -> fresh head
    -> balanced order, my slice -> train (DDP) -> (the harness:) report -> checkpoint

The harness runs these stages (stages.py), and stops, checkpoints and resumes between and
inside them: nothing here knows whether the epoch is new or resumed.

The features of my shard come from the paper's extra pass (clustering.features=extra_pass),
or from the feature bank the last epoch's training forward filled (training_pass), with
only its too-old rows recomputed (dcluster/runtime/feature_bank.py).

Each step lives in its own module; this one wires them together. The same code runs for one
process and for many: with one, every collective is the identity (dcluster/parallel/collectives.py).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcluster.clustering.backend import Backend
from dcluster.clustering.distributed_stage import (global_mean, kmeans, pca_whiten_l2,
                                                   row_layout, rows_of, sharded_kmeans,
                                                   spread_labels)
from dcluster.clustering.kmeans import machine_backend
from dcluster.clustering.pca import l2_normalize
from dcluster.core.config import Config, OptimConfig, check_key
from dcluster.parallel.distributed import my_indices
from dcluster.evaluation.network import Network
from dcluster.runtime.extract import ShardFeatures, extract_features
from dcluster.runtime.feature_bank import FeatureBank, TrainingFeatureTap
from dcluster.runtime.context import RunContext
from dcluster.core.metric_spec import Metric
from dcluster.core.metrics import clustering_accuracy, nmi
from dcluster.models import DeepClusterNet, build_model
from dcluster.runtime.optimize import data_parallel, sgd
from dcluster.runtime.run_state import Stateful
from dcluster.runtime.sampler import balanced_order, rank_slice
from dcluster.core.seeding import derived_seed
from dcluster.runtime.stages import BatchLoss, Epoch, Pass, PassPlan, Stage, Step

log = logging.getLogger("dcluster.methods.deepcluster.method")

NETWORK_KEYS: tuple[str, ...] = ()  # the config keys besides model.* its weights' shapes depend on

# what a DeepCluster epoch measures besides the loss, in its place on the epoch line
METRICS = (
    Metric("objective", "objective {objective:.4g}"),  # k-means' (clustering epochs)
    Metric("probe_nmi", "kmeans-C NMI {probe_nmi:.3f}", "scores", higher_is_better=True),
    Metric("probe_acc", "kmeans-C ACC {probe_acc:.3f}", "scores", higher_is_better=True),
    Metric("n_empty", "empty {n_empty:.0f} (reseeded {n_reseeded:.0f})", "after_monitor"),
    # the share of the images recomputed for the bank, and the clustered rows' mean age
    Metric("bank_refreshed", "bank refreshed {bank_refreshed:.0%}", "after_monitor"),
    Metric("bank_mean_age"),
    Metric("n_clusters"), Metric("n_reseeded"),
    Metric("time_kmeans"),  # of time_clustering: the rest is PCA, whitening, moving labels
)


class DeepCluster:
    """The method: its network and optimisers, and the epoch."""
    metrics = METRICS

    def __init__(self, ctx: RunContext) -> None:
        cfg, env = ctx.cfg, ctx.comm.env
        self.ctx = ctx
        self.epochs = cfg.epochs
        self.mine = my_indices(len(ctx.source), env)  # contiguous: every image on one rank
        self.model = ctx.execution.prepare(build_model(cfg.model, cfg.data.crop_size))
        lr = ctx.batch.lr
        log.info("%d images, %s", len(ctx.source), f"{len(ctx.source.class_names)} classes"
                 if ctx.source.class_names else "no classes")
        self.body_optimizer = body_optimizer(self.model, cfg.optim, lr, env.device)
        self.head = Head(self.model, lambda params: sgd(params, cfg.optim, lr, env.device))
        self.net: nn.Module = self.model
        # the hardware and FAISS's build detected once for the run (the start-up log's
        # "k-means backend" row, dcluster/train.py), not at every clustering
        self.kmeans_backend = machine_backend(cfg.clustering.backend, cfg.clustering.device)
        self.bank: Optional[FeatureBank] = None
        self.shard: Optional[ShardFeatures] = None  # the features the clustering step clusters
        # an epoch clusters the features it starts with (the extra pass), or those of the
        # last epoch's training forward (the bank), then trains
        self.scored_at = "start-of-epoch features"
        if cfg.clustering.features == "training_pass":
            self.bank = FeatureBank(len(ctx.source), ctx.comm, cfg.clustering.bank, env.device)
            self.scored_at = "training-pass features"
            log.info("clustering features: the training pass's, in a feature bank (%s, %s "
                     "memory), rows older than %d epoch(s) recomputed", cfg.clustering.bank.dtype,
                     cfg.clustering.bank.memory, cfg.clustering.bank.max_age)

    @staticmethod
    def check_data(cfg: Config, n_images: int) -> None:
        """Refuse settings the number of images rules out, before an image is decoded."""
        where = f"{n_images} images in {cfg.data.path}"
        check_key(cfg.clustering.k <= n_images, "clustering.k", cfg.clustering.k,
                  f"more clusters than images ({where})")
        if cfg.clustering.method == "pic":
            check_key(cfg.clustering.pic.knn < n_images, "clustering.pic.knn",
                      cfg.clustering.pic.knn, f"needs more images than neighbours ({where})")

    def state(self) -> dict[str, Stateful]:
        objects: dict[str, Stateful] = {"head": self.head, "model": self.model,
                                        "body_optimizer": self.body_optimizer}
        if self.bank is not None:
            objects["bank"] = self.bank
        return objects

    def after_restore(self) -> None:
        self.net = data_parallel(self.model, self.ctx.comm.env, cfg=self.ctx.cfg.distributed)

    def share_state(self) -> None:
        """Every rank holds the same labels, weights and optimiser state; the bank's rows go
        to the ranks that own them, which write them to their shard files."""
        if self.bank is not None:
            self.bank.flush()

    def stages(self, epoch: Epoch) -> list[Stage]:
        """The paper's epoch. Features and clustering only every clustering.every epochs (and
        in the first): in between, the pseudo-labels and head of the last clustering stay."""
        recluster = self.ctx.clusters.labels is None or \
            epoch.number % self.ctx.cfg.clustering.every == 0
        return [Step("features", lambda: self.features(epoch), "time_features",
                     skip=not recluster),
                Step("clustering", lambda: self.cluster(epoch), "time_clustering",
                     skip=not recluster),
                Pass("train", lambda: self.train(epoch))]

    def features(self, epoch: Epoch) -> None:
        """1. Features of this rank's shard: the extra pass (centre crops, eval mode), or the
        bank with its too-old rows recomputed."""
        self.shard = self.features_to_cluster(epoch.number, epoch.metrics)

    def cluster(self, epoch: Epoch) -> None:
        """2. The paper's section 3.4 across ranks: PCA to 256 dimensions, whitening and L2
        normalisation of every rank's rows, then k-means: every rank gets all N labels, and
        a fresh head for them."""
        ctx, cfg, shard, metrics = self.ctx, self.ctx.cfg, self.shard, epoch.metrics
        seed = derived_seed(cfg.seed, epoch.number, "kmeans")
        x = pca_whiten_l2(shard.features, shard.indices, len(ctx.source), cfg.clustering,
                          ctx.comm, seed, ctx.device)
        result = kmeans(x, cfg.clustering, ctx.comm, seed, ctx.device, self.kmeans_backend)
        del x  # gather mode: rank 0's N x 256 matrix, not to sit beside the probe's rows
        ctx.clusters.update(result.labels, result.n_clusters, epoch.number)
        metrics.update(objective=result.objective, n_clusters=result.n_clusters,
                       n_empty=result.n_empty, n_reseeded=result.n_reseeded,
                       time_kmeans=result.seconds)
        log.debug("clustering: %s, %d clusters, objective %.5g, %d empty, %d re-seeded",
                  result.backend, result.n_clusters, result.objective, result.n_empty,
                  result.n_reseeded)
        if cfg.eval.class_kmeans and ctx.source.targets is not None:
            metrics.update(class_probe(shard, ctx.source.targets, ctx, epoch.number,
                                       self.kmeans_backend))
        self.shard = None
        # drawn from (seed, epoch) so it is the same on every rank, and re-wrapped so that
        # DDP synchronises it
        self.head.reset(ctx.clusters.n_clusters, derived_seed(cfg.seed, epoch.number, "head"))
        self.net = data_parallel(self.model, ctx.comm.env, cfg=cfg.distributed)

    def train(self, epoch: Epoch) -> PassPlan:
        """3. The order: uniform over the non-empty clusters, the same global list on every
        rank, of which each takes its own equal slice. 4. Train on the pseudo-labels, the bank
        recording the features of each forward."""
        ctx, cfg, clusters = self.ctx, self.ctx.cfg, self.ctx.clusters
        order = rank_slice(balanced_order(clusters.labels, cfg.seed, epoch.number),
                           ctx.comm.rank, ctx.comm.world_size)
        plan = PassPlan(order, self.loss_of, [self.body_optimizer, self.head.optimizer],
                        self.net)
        if self.bank is not None:
            tap = TrainingFeatureTap(self.model.clustering_feature_layer())
            bank = self.bank
            plan.on_batch = lambda batch, iteration: bank.record(batch.indices, iteration,
                                                                 tap.take())
            plan.during = bank.recording(epoch.number, len(order), tap)
        return plan

    def loss_of(self, batch: Any) -> BatchLoss:
        """Cross-entropy of the network's scores against the batch's pseudo-labels."""
        images = self.ctx.execution.images(batch.images)
        targets = torch.from_numpy(self.ctx.clusters.labels[batch.indices.numpy()])
        loss = F.cross_entropy(self.net(images), targets.to(self.ctx.device, non_blocking=True))
        return BatchLoss(loss, images.shape[0])

    def features_to_cluster(self, epoch: int, metrics: dict[str, float]) -> ShardFeatures:
        """This rank's shard of the features the epoch clusters: the extra pass over all its
        images, or the bank after a pass over just its rows older than max_age (all of them
        in the first epoch). The pass ends early on a stop request."""
        ctx, cfg, bank = self.ctx, self.ctx.cfg, self.bank
        wanted = self.mine if bank is None else bank.stale(
            epoch, cfg.clustering.bank.max_age, set(ctx.pipelines.bad_indices))
        computed = extract_features(self.model, ctx.pipelines, wanted, cfg.extract.batch_size,
                                    ctx.device, cfg.progress, ctx.show,
                                    stop=ctx.stops.requested, keep_on_device=True,
                                    execution=ctx.execution)
        metrics["images_features"] = float(len(computed.indices))
        if bank is None:
            return computed
        bank.refresh(computed, epoch)
        ages = bank.ages(epoch)
        refreshed, age_sum, rows = ctx.comm.all_reduce_sum(np.array(
            [len(computed.indices), ages.sum(), ages.size], dtype=np.float64))
        # the share of the images recomputed, and how old the clustered rows are on average
        metrics.update(bank_refreshed=float(refreshed) / len(ctx.source),
                       bank_mean_age=float(age_sum / max(rows, 1.0)))
        return bank.features()

def body_optimizer(model: DeepClusterNet, cfg: OptimConfig, lr: float,
                   device: torch.device = torch.device("cpu")) -> torch.optim.SGD:
    """Everything trainable except the head: its momentum carries over from epoch to epoch,
    while the head's optimiser is re-created with the head at every clustering."""
    params = [p for name, p in model.named_parameters()
              if p.requires_grad and not name.startswith("head.")]
    return sgd(params, cfg, lr, device)


class Head:
    """The classifier head and its optimiser, re-created for every clustering: cluster ids
    carry no meaning from one clustering to the next (paper section 3.2). In the checkpoint it
    is its size and optimiser state (its weights are in the model's); restored first, so that
    the model's state finds a head of the right shape."""

    def __init__(self, model: DeepClusterNet, make_optimizer) -> None:
        self.model = model
        self.make_optimizer = make_optimizer
        self.optimizer: Optional[torch.optim.Optimizer] = None

    def reset(self, k: int, seed: int) -> None:
        head = self.model.reset_head(k, torch.Generator().manual_seed(seed))
        self.optimizer = self.make_optimizer(head.parameters())

    def state_dict(self) -> dict[str, Any]:
        head = self.model.head
        return {"n_clusters": head.out_features if head is not None else 0,
                "optimizer": self.optimizer.state_dict() if self.optimizer else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state["n_clusters"]:
            return
        self.reset(state["n_clusters"], seed=0)  # its weights come with the model's state
        if state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])


def class_probe(shard: ShardFeatures, targets: np.ndarray, ctx: RunContext,
                epoch: int, backend: Backend) -> dict[str, float]:
    """k-means with k = number of classes on this epoch's features (centred, L2-normalised,
    not whitened: whitening lifts noise directions to unit variance), scored against the
    classes. A label-free measure of feature quality that, unlike NMI of the pseudo-labels,
    does not depend on k. Sharded k-means (with the run's ``backend``), so the raw features
    stay on their ranks."""
    comm, cfg = ctx.comm, ctx.cfg
    x = rows_of(shard.host_features(), row_layout(shard.features, comm))
    x = l2_normalize(x - global_mean(x, comm))
    n_classes = int(targets.max()) + 1
    km = sharded_kmeans(x, n_classes, derived_seed(cfg.seed, epoch, "probe"), cfg.clustering,
                        comm, ctx.device, backend)
    pred = spread_labels(km.labels, shard.indices, len(targets), comm)
    keep = pred >= 0
    return {"probe_nmi": nmi(pred[keep], targets[keep]),
            "probe_acc": clustering_accuracy(pred[keep], targets[keep])}


def eval_network(cfg: Config, payload: Optional[dict[str, Any]]) -> Network:
    """The network `dcluster eval` reads: as trained (with the checkpoint's head, so that its
    state loads), or as initialised."""
    model = build_model(cfg.model, cfg.data.crop_size)
    if payload is not None and payload["head"]["n_clusters"]:
        model.reset_head(payload["head"]["n_clusters"], torch.Generator())
    return Network(model, model)



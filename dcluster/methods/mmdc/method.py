"""MMDC (paper Algorithm 1) on the run harness. One epoch, top to bottom (stages()):

    [refinement epochs: k-means on the embeddings -> targets] -> clustering pass (Hungarian
    re-assignment per batch, my slice) -> rotation pass (my slice) -> embeddings of my shard
    -> the nearest component of every image -> (the harness:) report -> checkpoint

Distributed as DeepCluster is: DDP over the network, every rank trains on its own slice of
one global order, so the ranks' batches are disjoint and each re-assigns targets only among
its own images; the targets are indexed by global image index and merged across ranks
before a checkpoint and after the clustering pass.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Any, Optional

import numpy as np

from dcluster.clustering import kmeans_labels
from dcluster.clustering.distributed_stage import row_layout, rows_of, spread_labels
from dcluster.core.config import Config, check_key
from dcluster.parallel.distributed import my_indices
from dcluster.evaluation.network import Network, OwnClusters
from dcluster.runtime.extract import ShardFeatures, extract_features
from dcluster.runtime.context import RunContext
from dcluster.core.metric_spec import Metric
from dcluster.methods.mmdc.assignment import match_labels, merge_owned
from dcluster.methods.mmdc.config import MMDCConfig
from dcluster.methods.mmdc.model import build_mmdc_model
from dcluster.methods.mmdc.passes import MOVED, PassContext, clustering_loss, rotation_loss
from dcluster.methods.mmdc.targets import TargetBank, Targets, mixture_means, nearest_component
from dcluster.runtime.optimize import data_parallel, sgd
from dcluster.runtime.run_state import Stateful
from dcluster.runtime.sampler import rank_slice
from dcluster.core.seeding import derived_rng, derived_seed
from dcluster.runtime.stages import Epoch, Pass, PassPlan, Stage, Step

log = logging.getLogger("dcluster.methods.mmdc")

NETWORK_KEYS = ("mmdc.k", "mmdc.dim", "mmdc.rotation")  # keys its weights' shapes depend on

# what an MMDC epoch measures besides the loss, in its place on the epoch line
METRICS = (
    Metric("loss_rotation", "rotation loss {loss_rotation:.4f}"),
    Metric("moved_fraction", "targets moved {moved_fraction:.1%}"),  # Hungarian re-assignments
    Metric("clusters_empty", "empty {clusters_empty:.0f}", "after_monitor"),
    Metric("largest_cluster"), Metric("lr"),
)


def lr_at(cfg: MMDCConfig, base_lr: float, epoch: int) -> float:
    """The step schedule: divided by lr_decay_factor at each of lr_decay_epochs (the paper:
    by 5 after epoch 350). A pure function of the epoch, so a resume needs no scheduler state."""
    return base_lr / cfg.lr_decay_factor ** sum(epoch >= e for e in cfg.lr_decay_epochs)


class MMDC:
    """The method: its network, optimiser and targets, and the epoch."""
    scored_at = "end-of-epoch features"  # the clusters: the trained embeddings' components
    metrics = METRICS

    def __init__(self, ctx: RunContext) -> None:
        cfg, env = ctx.cfg, ctx.comm.env
        self.ctx = ctx
        n_images = len(ctx.source)
        self.epochs = cfg.epochs + cfg.mmdc.refine_epochs
        self.mine = my_indices(n_images, env)
        self.bank = TargetBank(n_images, cfg.mmdc, cfg.seed)
        self.model = ctx.execution.prepare(build_mmdc_model(cfg))
        self.base_lr = ctx.batch.lr
        self.optimizer = sgd([p for p in self.model.parameters() if p.requires_grad], cfg.optim,
                             self.base_lr, env.device)
        # the two passes train different heads: DDP must expect parameters without gradients
        self.net = data_parallel(self.model, env, find_unused_parameters=True,
                                 cfg=cfg.distributed)
        # every image on its own drawn target: the draws are i.i.d., so the identity is as
        # random an initial assignment as any
        self.targets = Targets(assignment=np.arange(n_images, dtype=np.int64))
        self.training_order: Optional[np.ndarray] = None  # the global order of a clustering pass
        self.embeddings: Optional[ShardFeatures] = None  # the last report pass; weights unchanged
        log.info("MMDC: %d images, K=%d components in R^%d (%s means, sigma %g), rotation task "
                 "%s, %d + %d refinement epochs", n_images, cfg.mmdc.k,
                 self.bank.means.shape[1], cfg.mmdc.means, cfg.mmdc.sigma,
                 "on" if cfg.mmdc.rotation else "off", cfg.epochs, cfg.mmdc.refine_epochs)

    @staticmethod
    def check_data(cfg: Config, n_images: int) -> None:
        """Refuse settings the number of images rules out, before an image is decoded."""
        check_key(cfg.mmdc.k <= n_images, "mmdc.k", cfg.mmdc.k,
                  f"more mixture components than images ({n_images} in {cfg.data.path})")

    def state(self) -> dict[str, Stateful]:
        return {"model": self.model, "optimizer": self.optimizer, "targets": self.targets}

    def after_restore(self) -> None:
        pass  # the DDP replica wraps the very module whose state was loaded

    def share_state(self) -> None:
        """During a clustering pass each rank has re-assigned the targets of its own slice."""
        if self.training_order is not None:
            world_size = self.ctx.comm.world_size
            owned = [rank_slice(self.training_order, r, world_size) for r in range(world_size)]
            merge_owned(self.targets.assignment, owned, self.ctx.comm)

    def stages(self, epoch: Epoch) -> list[Stage]:
        """Algorithm 1's epoch, at the epoch's learning rate."""
        lr = lr_at(self.ctx.cfg.mmdc, self.base_lr, epoch.number)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        epoch.metrics["lr"] = lr
        return [Step("refine", lambda: self.refine_targets(epoch.number), "time_clustering"),
                Pass("clustering", lambda: self.clustering(epoch)),
                Pass("rotation", lambda: self.rotation(epoch), loss="loss_rotation",
                     skip=not self.ctx.cfg.mmdc.rotation),
                Step("clusters", lambda: self.assign_clusters(epoch), "time_features")]

    def refine_targets(self, epoch: int) -> None:
        """The refinement stage (section III.E, its last refine_epochs epochs): targets from
        k-means on the embeddings; before it, none."""
        self.targets.refined = self.refine(epoch) if epoch >= self.ctx.cfg.epochs else None

    def clustering(self, epoch: Epoch) -> PassPlan:
        """1. The clustering pass: Hungarian re-assignment within each batch, then L2 steps."""
        self.training_order = derived_rng(self.ctx.cfg.seed, epoch.number, "order").permutation(
            len(self.bank))

        def finish(totals: dict[str, int]) -> None:
            self.share_state()
            self.training_order = None
            epoch.metrics["moved_fraction"] = totals[MOVED] / max(totals["images"], 1)

        return PassPlan(self.my_slice(self.training_order),
                        partial(clustering_loss, self.losses(), self.bank, self.targets),
                        [self.optimizer], self.net, paired=True, tallies=(MOVED,),
                        finish=finish)

    def rotation(self, epoch: Epoch) -> PassPlan:
        """2. The rotation pass."""
        order = derived_rng(self.ctx.cfg.seed, epoch.number, "rotation_order").permutation(
            len(self.bank))
        return PassPlan(self.my_slice(order), partial(rotation_loss, self.losses()),
                        [self.optimizer], self.net)

    def losses(self) -> PassContext:
        return PassContext(self.net, self.model, self.ctx.execution, self.ctx.device)

    def assign_clusters(self, epoch: Epoch) -> None:
        """3. Clusters: the component nearest each embedding (paper eq. 3)."""
        comm, metrics = self.ctx.comm, epoch.metrics
        self.embeddings = self.embed_shard()
        metrics["images_features"] = float(len(self.embeddings.indices))
        labels = spread_labels(nearest_component(self.embeddings.features, self.bank.means),
                               self.embeddings.indices, len(self.bank), comm)
        self.ctx.clusters.update(labels, self.ctx.cfg.mmdc.k, epoch.number)
        sizes = self.ctx.clusters.sizes()
        metrics.update(clusters_empty=float((sizes == 0).sum()),
                       largest_cluster=float(sizes.max() / max(sizes.sum(), 1)))

    def my_slice(self, global_order: np.ndarray) -> np.ndarray:
        return rank_slice(global_order, self.ctx.comm.rank, self.ctx.comm.world_size)

    def embed_shard(self) -> ShardFeatures:
        ctx = self.ctx
        return extract_features(self.model, ctx.pipelines, self.mine, ctx.cfg.extract.batch_size,
                                ctx.device, ctx.cfg.progress, ctx.show, compute=self.model.embed,
                                execution=ctx.execution)

    def refine(self, epoch: int) -> np.ndarray:
        """The component each image is pulled to in a refinement epoch (paper III.E): its
        k-means cluster (k = K, on the embeddings of all ranks, each rank keeping its own
        rows: the sharded k-means), numbered to agree most with the components the images
        were pulled to so far, so that the clusters keep their targets. Only the cluster
        numbers reach rank 0, for the matching. The same on every rank."""
        cfg, comm = self.ctx.cfg, self.ctx.comm
        shard = self.embeddings or self.embed_shard()
        layout = row_layout(shard.features, comm)
        rows = ShardFeatures(rows_of(shard.features, layout), shard.indices).host_features()
        clusters = kmeans_labels(rows, cfg.mmdc.k, derived_seed(cfg.seed, epoch, "refine"),
                                 cfg.clustering.niter, cfg.clustering.device, plus_plus=True,
                                 backend=cfg.clustering.backend, comm=comm,
                                 own_device=self.ctx.device)
        clusters = comm.gather_rows(clusters, layout.counts)
        indices = comm.gather_rows(shard.indices, layout.counts)
        refined = np.full(len(self.bank), -1, dtype=np.int64)
        if comm.is_main:
            t = self.targets
            before = t.refined if t.refined is not None else self.bank.components[t.assignment]
            refined[indices] = match_labels(clusters, before[indices], cfg.mmdc.k)
        return comm.broadcast(refined)


def eval_network(cfg: Config, payload: Optional[dict[str, Any]]) -> Network:
    """The network `dcluster eval` reads, with its embedding and mixture means (eq. 3)."""
    mmdc = build_mmdc_model(cfg)
    means = mixture_means(cfg.mmdc, cfg.seed)
    return Network(mmdc, mmdc.backbone, OwnClusters(
        mmdc.embed, lambda embedded: nearest_component(embedded, means)))



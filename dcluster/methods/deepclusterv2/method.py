"""DeepCluster-v2 (SwAV paper, appendix; facebookresearch/swav main_deepclusterv2.py) on the
run harness. One epoch, top to bottom (stages()):

    the memory bank's missing rows (the first epoch: all; centre crops, eval mode)
    -> per head: spherical k-means of one view's bank across ranks -> frozen prototypes,
       every image's assignment
    -> train on a random order, my slice: every view of an image predicts its assignments
       (LARS, warm-up + cosine per step); the views named by crops_for_assign refill the bank
    -> (the harness:) report -> checkpoint

Unlike DeepCluster v1 there is no extra feature pass and no head re-created: the bank holds
the embeddings the last epoch's training forward computed (runtime/feature_bank.py, one bank
per clustered view, rows on the rank that owns the image), and the classifier is the set of
prototypes the k-means sets. The harness runs the stages, and stops, checkpoints and resumes
between and inside them; nothing here knows whether the epoch is new or resumed.
"""
from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcluster.clustering.distributed_stage import spread_labels
from dcluster.clustering.kmeans import machine_backend
from dcluster.core.config import BankConfig, Config, ConfigError, check_key
from dcluster.core.metric_spec import Metric
from dcluster.core.metrics import nmi
from dcluster.core.seeding import derived_rng, derived_seed
from dcluster.data import num_batches
from dcluster.evaluation.network import Network, OwnClusters
from dcluster.methods.deepclusterv2.lars import LARS, lars_param_groups
from dcluster.methods.deepclusterv2.loss import UNASSIGNED, prototype_loss
from dcluster.methods.deepclusterv2.model import DeepClusterV2Net, build
from dcluster.methods.deepclusterv2.schedule import lr_at
from dcluster.methods.deepclusterv2.spherical_kmeans import spherical_kmeans
from dcluster.runtime.context import RunContext
from dcluster.runtime.extract import extract_features
from dcluster.runtime.feature_bank import FeatureBank
from dcluster.runtime.optimize import data_parallel
from dcluster.runtime.run_state import Stateful
from dcluster.runtime.sampler import rank_slice
from dcluster.runtime.stages import BatchLoss, Epoch, Pass, PassPlan, Stage, Step

log = logging.getLogger("dcluster.methods.deepclusterv2")

NETWORK_KEYS = ("deepclusterv2.feat_dim", "deepclusterv2.hidden_mlp", "deepclusterv2.prototypes")

# what a DeepCluster-v2 epoch measures besides the loss, in its place on the epoch line
METRICS = (
    Metric("lr", "lr {lr:.4g}"),  # at the pass's last step
    Metric("empty_prototypes", "empty {empty_prototypes:.0f}", "after_monitor"),
    Metric("heads_nmi", "heads NMI {heads_nmi:.3f}", "scores", higher_is_better=True),
    Metric("bank_refreshed", "bank refreshed {bank_refreshed:.0%}", "after_monitor"),
    Metric("time_kmeans"),
)

# the bank keeps each view's last embedding as it is: a row is replaced, never blended
BANK = BankConfig(max_age=1, dtype="float32", momentum=0.0)


def view_sizes(cfg: Config) -> list[int]:
    """The side of every view a training batch holds, in order (data.crops, or the one crop)."""
    if not cfg.data.crops:
        return [cfg.data.crop_size]
    return [group["size"] for group in cfg.data.crops for _ in range(group["count"])]


class Assignments:
    """Every image's cluster for each head (int64 (heads, N), UNASSIGNED before the first
    clustering): label-wide, so every rank holds them all, as the pseudo-labels of v1."""

    def __init__(self, heads: int, n_images: int) -> None:
        self.labels = np.full((heads, n_images), UNASSIGNED, dtype=np.int64)

    def of(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """Each head's assignments of the images ``indices``."""
        return [torch.from_numpy(head[indices.numpy()]) for head in self.labels]

    def state_dict(self) -> dict[str, Any]:
        return {"labels": self.labels}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.labels = state["labels"]


class DeepClusterV2:
    """The method: its network, optimiser, memory banks and assignments, and the epoch."""
    scored_at = "training-pass embeddings"  # the clusters: the bank's, through head 0
    metrics = METRICS

    def __init__(self, ctx: RunContext) -> None:
        cfg, env, v2 = ctx.cfg, ctx.comm.env, ctx.cfg.deepclusterv2
        self.ctx, self.v2 = ctx, v2
        self.epochs = cfg.epochs
        n_images = len(ctx.source)
        model: nn.Module = build(cfg.model, v2, cfg.data.crop_size, view_sizes(cfg))
        # statistics over the global batch, as swav's; SyncBatchNorm runs on GPUs only
        # (torch/nn/modules/batchnorm.py: "expected input tensor to be on GPU")
        synced = env.world_size > 1 and env.device.type == "cuda"
        if synced:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model: DeepClusterV2Net = ctx.execution.prepare(model)
        log.info("DeepCluster-v2: %d images, %d view(s) %s, heads %s, embedding %d, "
                 "BatchNorm %s", n_images, len(view_sizes(cfg)), view_sizes(cfg),
                 v2.prototypes, v2.feat_dim, "synchronised across ranks" if synced
                 else "per rank")
        self.optimizer = LARS(lars_param_groups(self.model), lr=ctx.batch.lr,
                              momentum=cfg.optim.momentum,
                              weight_decay=cfg.optim.weight_decay, eta=v2.lars_eta)
        self.net = data_parallel(self.model, env, cfg=cfg.distributed)
        # what assigns the banks' rows to centroids: chosen once for the run
        self.kmeans_backend = machine_backend(cfg.clustering.backend, cfg.clustering.device)
        self.banks = [FeatureBank(n_images, ctx.comm, BANK, env.device)
                      for _ in v2.crops_for_assign]
        self.assignments = Assignments(len(v2.prototypes), n_images)
        self.embedded: Optional[torch.Tensor] = None  # the last training forward's, unit rows

    @staticmethod
    def check_data(cfg: Config, n_images: int) -> None:
        """Refuse settings the number of images or the network rules out, before an image is
        decoded."""
        for head, k in enumerate(cfg.deepclusterv2.prototypes):
            check_key(k <= n_images, f"deepclusterv2.prototypes[{head}]", k,
                      f"more clusters than images ({n_images} in {cfg.data.path})")
        try:
            build(cfg.model, cfg.deepclusterv2, cfg.data.crop_size, view_sizes(cfg))
        except ValueError as err:
            raise ConfigError(f"config key 'model.arch' = {cfg.model.arch!r}: {err}") from None

    def state(self) -> dict[str, Stateful]:
        return {"model": self.model, "optimizer": self.optimizer,
                "assignments": self.assignments,
                **{f"bank{number}": bank for number, bank in enumerate(self.banks)}}

    def after_restore(self) -> None:
        pass  # the DDP replica wraps the very module whose state was loaded

    def share_state(self) -> None:
        """The banks' rows go to the ranks that own them, which write them to their shards."""
        for bank in self.banks:
            bank.flush()

    def stages(self, epoch: Epoch) -> list[Stage]:
        return [Step("bank", lambda: self.fill_banks(epoch), "time_features"),
                Step("clustering", lambda: self.cluster(epoch), "time_clustering"),
                Pass("train", lambda: self.train(epoch))]

    def fill_banks(self, epoch: Epoch) -> None:
        """1. The rows no training pass has written since the last epoch (all of them in the
        first): embeddings of the centre crops, in eval mode, into every bank."""
        ctx = self.ctx
        wanted = self.banks[0].stale(epoch.number, BANK.max_age,
                                     set(ctx.pipelines.bad_indices))
        computed = extract_features(self.model, ctx.pipelines, wanted,
                                    ctx.cfg.extract.batch_size, ctx.device, ctx.cfg.progress,
                                    ctx.show, compute=self.unit_embeddings,
                                    stop=ctx.stops.requested, execution=ctx.execution)
        for bank in self.banks:
            bank.refresh(computed, epoch.number)
        refreshed = ctx.comm.all_reduce_sum(np.array([len(computed.indices)], dtype=np.int64))
        epoch.metrics["bank_refreshed"] = float(refreshed[0]) / len(ctx.source)

    def cluster(self, epoch: Epoch) -> None:
        """2. Each head: spherical k-means of its view's bank (head h clusters bank
        h % banks), spread over the ranks' shards; the centroids become its prototypes, the
        clusters every image's assignment."""
        ctx, v2, metrics = self.ctx, self.v2, epoch.metrics
        n_images, empty, seconds = len(ctx.source), 0, 0.0
        for head, k in enumerate(v2.prototypes):
            shard = self.banks[head % len(self.banks)].features()
            result = spherical_kmeans(
                shard.host_features(), k, iters=v2.kmeans_iters,
                seed=derived_seed(ctx.cfg.seed, epoch.number, "kmeans", head), comm=ctx.comm,
                backend=self.kmeans_backend, own_device=ctx.device)
            self.model.set_prototypes(head, result.centroids)
            labels = spread_labels(result.labels, shard.indices, n_images, ctx.comm)
            self.assignments.labels[head] = np.where(labels >= 0, labels, UNASSIGNED)
            empty += result.n_empty
            seconds += result.seconds
        ctx.clusters.update(np.where(self.assignments.labels[0] >= 0,
                                     self.assignments.labels[0], -1),
                            v2.prototypes[0], epoch.number)
        metrics.update(empty_prototypes=float(empty), time_kmeans=seconds)
        if len(v2.prototypes) > 1:  # how much the heads agree: their clusterings' mean NMI
            pairs = [nmi(self.assignments.labels[a], self.assignments.labels[b])
                     for a in range(len(v2.prototypes)) for b in range(a)]
            metrics["heads_nmi"] = float(np.mean(pairs))

    def train(self, epoch: Epoch) -> PassPlan:
        """3. A random order of all images, my slice; every step at the lr of its global
        step, the clustered views' embeddings written to the banks."""
        ctx, cfg, v2 = self.ctx, self.ctx.cfg, self.v2
        order = rank_slice(derived_rng(cfg.seed, epoch.number, "order").permutation(
            len(ctx.source)), ctx.comm.rank, ctx.comm.world_size)
        steps_per_epoch = num_batches(len(order), ctx.batch.per_process)

        def on_batch(batch: Any, iteration: int) -> None:
            size = len(batch.indices)
            for bank, view in zip(self.banks, v2.crops_for_assign):
                bank.record(batch.indices, iteration,
                            self.embedded[view * size:(view + 1) * size])
            lr = lr_at(epoch.number * steps_per_epoch + iteration, steps_per_epoch,
                       self.epochs, v2.warmup_epochs, v2.start_warmup, ctx.batch.lr,
                       v2.final_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            epoch.metrics["lr"] = lr

        return PassPlan(order, self.loss_of, [self.optimizer], self.net, on_batch=on_batch,
                        during=self.recording(epoch.number, len(order)))

    def loss_of(self, batch: Any) -> BatchLoss:
        """Every view's prototype scores against its image's assignments, over the heads."""
        views = [self.ctx.execution.images(view) for view in batch.views]
        embeddings, scores = self.net(views)
        self.embedded = F.normalize(embeddings.detach().float(), dim=1)
        loss = prototype_loss(scores, self.assignments.of(batch.indices), self.v2.temperature,
                              len(views))
        return BatchLoss(loss, len(batch.indices))

    def unit_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """The bank's rows: unit in float32 whatever the autocast computed them in."""
        return F.normalize(self.model.embed(images).float(), dim=1)

    @contextmanager
    def recording(self, epoch: int, capacity: int) -> Iterator[None]:
        """Around the training pass: every bank records, then delivers its rows."""
        with ExitStack() as stack:
            for bank in self.banks:
                stack.enter_context(bank.recording(epoch, capacity))
            yield


def eval_network(cfg: Config, payload: Optional[dict[str, Any]]) -> Network:
    """The network `dcluster eval` reads, its own clusters those of the first head: the
    prototype of largest cosine with an image's embedding."""
    model = build(cfg.model, cfg.deepclusterv2, cfg.data.crop_size, view_sizes(cfg))

    def nearest_prototype(embedded: np.ndarray) -> np.ndarray:
        prototypes = model.prototypes[0].weight.detach().float().cpu().numpy()
        return np.argmax(embedded @ prototypes.T, axis=1)

    return Network(model, model.backbone, OwnClusters(model.embed, nearest_prototype))

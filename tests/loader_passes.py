"""Whole passes of a loader collected into tensors, shared by the loader tests."""
import numpy as np
import torch


def feature_pass(pipes, indices, batch_size=4):
    batches = list(pipes.feature_batches(indices, batch_size))
    return torch.cat([b.images for b in batches]), torch.cat([b.indices for b in batches]), batches


def train_pass(pipes, order, epoch, batch_size=4, start_position=0, targets=None):
    targets = np.arange(len(pipes.source)) % 3 if targets is None else targets
    batches = list(pipes.train_batches(order, targets, epoch, batch_size, start_position))
    return (torch.cat([b.images for b in batches]), torch.cat([b.indices for b in batches]),
            batches)

"""One training step's pieces, shared by folds trained in turn (``nodulekit.training``) and side by
side (``nodulekit.concurrent_folds``): the batches of an epoch and the loss of a batch."""

from __future__ import annotations

import numpy as np


def epoch_batches(train_index, generator, batch_size: int, last_batch: str, device) -> list:
    """The row indices of one epoch's batches: the generator's permutation of ``train_index`` cut
    into ``batch_size`` slices. The last partial slice trains when ``last_batch="keep"`` and it
    has at least 2 rows (batch normalisation cannot train on one); ``"drop"`` skips it."""
    import torch

    order = torch.from_numpy(np.asarray(train_index, np.int64))[torch.randperm(len(train_index), generator=generator)]
    order = order.to(device)
    smallest = batch_size if last_batch == "drop" else 2
    slices = (order[start : start + batch_size] for start in range(0, len(order), batch_size))
    return [idx for idx in slices if len(idx) >= smallest]


def batch_loss(forward, batch: dict):
    """(loss, cross-entropy, logits) of one batch: cross-entropy + the model's auxiliary loss.

    ``forward`` is a model's ``training_forward`` (or its compiled version); every model
    goes through it, multi-task or not.
    """
    import torch.nn.functional as F

    logits, aux = forward(batch)
    target = batch.get("target")  # a recipe's soft targets [B, 2], else the hard labels
    ce = F.cross_entropy(logits.float(), batch["y"] if target is None else target)
    return ce + aux.float(), ce, logits

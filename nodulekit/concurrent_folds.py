"""Folds side by side: the folds of one architecture trained together as one batched computation.

A 32x32 model of a few million parameters cannot fill a GPU with a batch of 32; five of
them can. Here the F fold models' parameters and buffers are stacked on a leading fold
axis (``torch.func.stack_module_state``) and one step runs all of them at once with
``torch.func.vmap`` over ``functional_call`` (for convolutions vmap issues one grouped
convolution). Each fold still has its own everything:

- its own batches, drawn from its own training rows by its own generator (the same
  permutations as sequential training, since the generators are the same);
- its own forward pass, loss and auxiliary loss: nothing is reduced across folds; the
  gradient of the summed losses with respect to fold f's weights is fold f's gradient;
- its own batch statistics: batch normalisation normalises over the fold's own batch
  and updates the fold's own running statistics (stacked buffers, updated in place);
- its own optimiser state: SGD is elementwise, so one SGD over stacked tensors is F
  SGDs; its momentum is copied from and back to each fold's own ``torch.optim.SGD``.

Folds with fewer training rows run out of batches first. A step where only some folds
have a batch (or their last batches differ in size) runs those folds alone, on slices
of the stacked weights, and leaves the others exactly as they were: their weights and
momentum are put back after the optimiser step, which would otherwise move them by
weight decay and momentum.

Under bf16 autocast each fold computes in the dtypes it has when trained alone. vmap
skips autocast for convolutions and linear layers with batched (stacked) weights: on the
CPU they silently ran in float32, on CUDA the input and weight were cast but not the
bias ("Input type (c10::BFloat16) and bias type (float) should be the same", torch 2.11,
H200). So inside the batched computation those layers cast their input, weight and bias
to the autocast dtype themselves (:func:`lower_precision_by_hand`), as autocast does for
a fold alone; everything else (einsum, batch norm, the loss) is left to autocast.

Models that draw random numbers in their forward pass (dropout) are refused: vmap would
draw one tensor for all folds from one generator, so the folds could not get the same
numbers as when trained alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

from nodulekit.errors import NodulekitError
from nodulekit.train_step import batch_loss, epoch_batches


def refusal(model) -> str | None:
    """Why ``model`` cannot be trained side by side, or None when it can."""
    from torch import nn

    random = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)})
    if random:
        return (
            f"{getattr(model, 'arch', type(model).__name__)} draws random numbers in training ({', '.join(random)}), "
            "so its folds side by side could not match folds trained alone"
        )
    return None


def batch_norm_by_hand_needed(device, amp: bool = False) -> bool:
    """Whether folds side by side on ``device`` must normalise with :func:`batch_norm_by_hand`.

    CUDA's batch-norm kernels ask whether their input is channels_last-contiguous, which
    vmap cannot answer ("NYI: querying is_contiguous inside of vmap", torch 2.11, seen on an
    H200); the CPU kernels do not ask, so the CPU keeps torch's own batch norm in float32.
    Under bf16 autocast (``amp``) the CPU's batched batch norm refuses a bf16 input with
    float32 weights ("expected scalar type BFloat16 but found Float", torch 2.13), which the
    kernel of a fold alone accepts: the hand-written one computes as that kernel does.
    """
    return amp or str(device).split(":")[0] != "cpu"


def batch_norm_by_hand(bn, x):
    """``bn``'s forward (any ``nn.BatchNorm*d``) written out in tensor operations that vmap can batch.

    The same arithmetic as torch's: normalise with the batch's biased variance in training,
    update the running mean and the *unbiased* variance with ``bn.momentum``, count the
    batch; in eval mode use the running statistics. Computed in float32 (float64 stays
    float64) and returned in the input's dtype, as torch's kernels do under bf16 autocast.
    """
    import torch

    if bn.momentum is None:
        raise NodulekitError(
            "internal: side-by-side folds need BatchNorm momentum (cumulative averages are not supported)"
        )
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    shape = [1, -1] + [1] * (x.dim() - 2)
    if bn.training or bn.running_mean is None:
        dims = [0, *range(2, x.dim())]
        mean, var = xf.mean(dims), xf.var(dims, unbiased=False)
        if bn.training and bn.track_running_stats:
            n = xf.numel() // xf.shape[1]
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                bn.running_mean.mul_(1 - bn.momentum).add_(mean.detach() * bn.momentum)
                bn.running_var.mul_(1 - bn.momentum).add_(var.detach() * (n / (n - 1) * bn.momentum))
    else:
        mean, var = bn.running_mean.to(xf.dtype), bn.running_var.to(xf.dtype)
    y = (xf - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.reshape(shape).to(xf.dtype) + bn.bias.reshape(shape).to(xf.dtype)
    return y.to(x.dtype)


# autocast's lower-precision layers whose batching rule under vmap bypasses it (checked by the tests)
def _lower_precision_layers():
    from torch import nn

    return (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def lower_precision_by_hand(layer, x):
    """``layer``'s forward (a convolution or linear layer) with autocast's casts written out.

    Under autocast for ``x``'s device its input, weight and bias are cast to the autocast
    dtype before the operation, as autocast does for these layers outside vmap; without
    autocast it is the layer's own forward.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return type(layer).forward(layer, x)
    dtype = torch.get_autocast_dtype(device_type)
    weight = layer.weight.to(dtype)
    bias = layer.bias.to(dtype) if layer.bias is not None else None
    x = x.to(dtype)
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        op = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[len(layer.kernel_size)]
        args = (layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation)
        return op(x, weight, bias, *args)
    return layer._conv_forward(x, weight, bias)


def _fold_loss_module(model, by_hand: bool = False):
    """A module computing one fold's training loss on one batch with ``train_step.batch_loss``.

    A module (not a function) so ``functional_call`` can run it with one fold's slice of the
    stacked weights; its own copy of ``model`` only provides structure, modes and settings.
    ``by_hand``: its batch norms run :func:`batch_norm_by_hand` (see :func:`batch_norm_by_hand_needed`).
    Its convolutions and linear layers always run :func:`lower_precision_by_hand` (the same
    arithmetic as their own forward without autocast).
    """
    import copy
    import functools

    from torch import nn

    class FoldLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = copy.deepcopy(model)
            for m in self.model.modules():
                if by_hand and isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.forward = functools.partial(batch_norm_by_hand, m)
                elif isinstance(m, _lower_precision_layers()):
                    m.forward = functools.partial(lower_precision_by_hand, m)

        def forward(self, x, y, index, mask, characteristics):
            """(loss, cross-entropy, correct count) of one fold on one batch."""
            batch = {"x": x, "y": y, "index": index}
            batch.update({k: v for k, v in (("mask", mask), ("characteristics", characteristics)) if v is not None})
            loss, ce, logits = batch_loss(self.model.training_forward, batch)
            return loss, ce.detach(), (logits.detach().argmax(1) == y).sum()

    return FoldLoss()


class StackedFolds:
    """F fold models as stacked tensors (weights, buffers, SGD momentum), stepped as one.

    Built from the folds' own models and optimisers at the start of an epoch and written
    back into them by :meth:`unstack` at its end, so checkpoints stay per fold.
    """

    def __init__(self, folds: Sequence, amp: bool = False):
        import torch
        from torch.func import stack_module_state

        self.folds = list(folds)
        params, buffers = stack_module_state([f.model for f in self.folds])
        self.params = {f"model.{k}": v for k, v in params.items()}
        self.buffers = {f"model.{k}": v for k, v in buffers.items()}
        device = next(self.folds[0].model.parameters()).device
        self.module = _fold_loss_module(self.folds[0].model, by_hand=batch_norm_by_hand_needed(device, amp))
        self.module.train()
        hyper = _shared_hyperparameters([f.optimizer for f in self.folds])
        self.optimizer = torch.optim.SGD([{**hyper, "params": list(self.params.values())}])
        for name, stacked in self.params.items():
            buffers = [_momentum(f, name) for f in self.folds]
            if any(b is not None for b in buffers):
                # a fold without momentum yet starts from zeros: SGD's first step makes it the step itself
                rows = [b if b is not None else torch.zeros_like(stacked[0]) for b in buffers]
                self.optimizer.state[stacked]["momentum_buffer"] = torch.stack(rows)

    def step(self, rows: list[int], batch: dict, amp: bool):
        """One optimiser step of the folds at positions ``rows`` on their batches ``batch`` [len(rows), B, ...].

        Returns (loss, cross-entropy, correct count), one value per row.
        """
        import torch
        from torch.func import functional_call, vmap

        whole = len(rows) == len(self.folds)
        sel = None if whole else torch.tensor(rows, device=batch["x"].device)
        params = self.params if whole else {k: v.index_select(0, sel) for k, v in self.params.items()}
        buffers = self.buffers if whole else {k: v.index_select(0, sel) for k, v in self.buffers.items()}

        def one(p, b, x, y, index, mask, characteristics):
            return functional_call(self.module, (p, b), (x, y, index, mask, characteristics), strict=True)

        ctx = torch.autocast(device_type=batch["x"].device.type, dtype=torch.bfloat16) if amp else nullcontext()
        args = (
            params,
            buffers,
            batch["x"],
            batch["y"],
            batch["index"],
            batch.get("mask"),
            batch.get("characteristics"),
        )
        in_dims = tuple(None if a is None else 0 for a in args)
        with ctx:
            loss, ce, correct = vmap(one, in_dims=in_dims, randomness="error")(*args)
        self.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # folds share no weights: each fold's gradient is its own loss's
        if whole:
            self.optimizer.step()
        else:
            self._step_only(sel)
            with torch.no_grad():
                for k, v in buffers.items():  # running statistics were updated on the slices
                    self.buffers[k].index_copy_(0, sel, v)
        return loss.detach(), ce, correct

    def _step_only(self, sel) -> None:
        """Optimiser step for the rows ``sel``; every other fold's weights and momentum stay as they were."""
        import torch

        keep = torch.tensor(
            [i for i in range(len(self.folds)) if i not in set(sel.tolist())], device=sel.device, dtype=torch.long
        )
        saved = {k: v.detach().index_select(0, keep) for k, v in self.params.items()}
        momentum = {}
        for k, v in self.params.items():
            buf = self.optimizer.state.get(v, {}).get("momentum_buffer")
            momentum[k] = buf.index_select(0, keep) if buf is not None else None
        self.optimizer.step()
        with torch.no_grad():
            for k, v in self.params.items():
                v.index_copy_(0, keep, saved[k])
                buf = self.optimizer.state.get(v, {}).get("momentum_buffer")
                if buf is not None:
                    buf.index_copy_(0, keep, momentum[k] if momentum[k] is not None else torch.zeros_like(saved[k]))

    def unstack(self) -> None:
        """Write the stacked weights, buffers and momentum back into each fold's model and optimiser."""
        import torch

        with torch.no_grad():
            for i, fold in enumerate(self.folds):
                named = dict(fold.model.named_parameters(prefix="model"))
                for k, v in self.params.items():
                    named[k].copy_(v[i])
                    buf = self.optimizer.state.get(v, {}).get("momentum_buffer")
                    if buf is not None:
                        fold.optimizer.state[named[k]]["momentum_buffer"] = buf[i].clone()
                own = dict(fold.model.named_buffers(prefix="model"))
                for k, v in self.buffers.items():
                    own[k].copy_(v[i])


def _momentum(fold, name: str):
    param = dict(fold.model.named_parameters(prefix="model"))[name]
    return fold.optimizer.state.get(param, {}).get("momentum_buffer")


def _shared_hyperparameters(optimizers) -> dict:
    """The one param group's settings (lr, momentum, ...), which every fold must share this epoch."""
    groups = [opt.param_groups for opt in optimizers]
    if any(len(g) != 1 for g in groups):
        raise NodulekitError("internal: side-by-side folds expect one parameter group per optimiser")
    hyper = [{k: v for k, v in g[0].items() if k != "params"} for g in groups]
    if any(h != hyper[0] for h in hyper[1:]):
        raise NodulekitError("internal: folds side by side must be at the same epoch (same learning rate)")
    return hyper[0]


@dataclass
class EpochResult:
    """One fold's training metrics of one epoch, as ``training._train_epoch`` reports them."""

    train_loss: float  # mean cross-entropy
    train_acc: float
    total_loss: float  # mean of cross-entropy + auxiliary loss (NaN/inf: the fold diverged)


def train_epoch_side_by_side(folds: Sequence, dd, batch_size: int, amp: bool, last_batch: str = "keep"):
    """One epoch of every fold in ``folds`` as one batched computation; a list of :class:`EpochResult`.

    Each fold draws its batch order from its own generator exactly as sequential training
    does; on return each fold's model and optimiser hold the state after its epoch.
    """
    import torch

    for fold in folds:
        fold.model.train()
    batches = [epoch_batches(f.split.train_index, f.generator, batch_size, last_batch, dd.device) for f in folds]
    stacked = StackedFolds(folds, amp)
    n = len(folds)
    ce_sum, total_sum, correct = (torch.zeros(n, device=dd.device) for _ in range(3))
    seen = torch.zeros(n, dtype=torch.long)
    for step in range(max(len(b) for b in batches)):
        for rows in _rows_by_batch_size(batches, step):
            idx = torch.stack([batches[i][step] for i in rows])
            loss, ce, right = stacked.step(rows, dd.batch(idx), amp)
            sel = torch.tensor(rows, device=dd.device)
            size = idx.shape[1]
            ce_sum.index_add_(0, sel, (ce * size).to(ce_sum.dtype))
            total_sum.index_add_(0, sel, (loss * size).to(total_sum.dtype))
            correct.index_add_(0, sel, right.to(correct.dtype))
            seen[rows] += size
    stacked.unstack()
    ce_sum, total_sum, correct = ce_sum.cpu(), total_sum.cpu(), correct.cpu()  # one sync per epoch
    return [
        EpochResult(
            float(ce_sum[i]) / max(int(seen[i]), 1),
            float(correct[i]) / max(int(seen[i]), 1),
            float(total_sum[i]) / max(int(seen[i]), 1),
        )
        for i in range(n)
    ]


def _rows_by_batch_size(batches: list[list], step: int) -> list[list[int]]:
    """Fold positions that have a batch at ``step``, grouped by batch size (one vmap per group)."""
    groups: dict[int, list[int]] = {}
    for i, fold_batches in enumerate(batches):
        if step < len(fold_batches):
            groups.setdefault(len(fold_batches[step]), []).append(i)
    return list(groups.values())

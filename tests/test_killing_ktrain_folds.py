"""Known answers for the pieces of folds side by side (``nodulekit.concurrent_folds``) that the
whole-run comparisons do not reach: batch norm written out for every kind of BatchNorm setting,
autocast's casts written out for every layer kind and its arguments, how steps are grouped, and
the refusals' messages."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nodulekit import concurrent_folds as CF
from nodulekit.errors import NodulekitError


def _bn(kind, channels, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    bn = kind(channels, **kw).double()
    with torch.no_grad():
        if bn.affine:
            bn.weight.copy_(torch.rand(channels, generator=g, dtype=torch.float64) + 0.5)
            bn.bias.copy_(torch.randn(channels, generator=g, dtype=torch.float64))
        if bn.track_running_stats:
            bn.running_mean.copy_(torch.randn(channels, generator=g, dtype=torch.float64))
            bn.running_var.copy_(torch.rand(channels, generator=g, dtype=torch.float64) + 0.5)
    return bn


@pytest.mark.parametrize(
    ("kind", "shape", "kw"),
    [
        (nn.BatchNorm1d, (6, 3), {"momentum": 0.25}),
        (nn.BatchNorm1d, (6, 3, 5), {"momentum": 0.5, "eps": 0.1}),
        (nn.BatchNorm2d, (4, 3, 2, 3), {"affine": False}),
        (nn.BatchNorm3d, (3, 3, 2, 2, 2), {"momentum": 0.1}),
        (nn.BatchNorm2d, (4, 3, 2, 3), {"track_running_stats": False}),
    ],
    ids=["1d-flat", "1d-eps", "2d-no-affine", "3d", "2d-no-running-stats"],
)
def test_batch_norm_by_hand_equals_torch_for_every_setting(kind, shape, kw):
    g = torch.Generator().manual_seed(4)
    ref, mine = _bn(kind, 3, 0, **kw), _bn(kind, 3, 0, **kw)
    for _ in range(2):
        x = torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 1
        torch.testing.assert_close(CF.batch_norm_by_hand(mine, x), ref(x), rtol=0, atol=1e-12)
    if ref.track_running_stats:
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(mine, name), getattr(ref, name), rtol=0, atol=1e-12)
    ref.eval(), mine.eval()
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(CF.batch_norm_by_hand(mine, x), ref(x), rtol=0, atol=1e-12)


def test_batch_norm_by_hand_in_bf16_matches_torch_in_float32():
    bn, ref = _bn(nn.BatchNorm2d, 3, 1).float(), _bn(nn.BatchNorm2d, 3, 1).float()
    x = (torch.randn(8, 3, 4, 4) * 3 + 2).to(torch.bfloat16)
    out = CF.batch_norm_by_hand(bn, x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref(x.float()).to(torch.bfloat16), rtol=2**-7, atol=2**-7)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-6, atol=1e-6)
    bn.eval(), ref.eval()
    torch.testing.assert_close(CF.batch_norm_by_hand(bn, x), ref(x.float()).to(torch.bfloat16), rtol=2**-7, atol=2**-7)
    half = CF.batch_norm_by_hand(bn, x.to(torch.float16))
    assert half.dtype == torch.float16


def test_batch_norm_by_hand_refuses_cumulative_averages():
    with pytest.raises(
        NodulekitError,
        match=r"^internal: side-by-side folds need BatchNorm momentum \(cumulative averages are not supported\)$",
    ):
        CF.batch_norm_by_hand(nn.BatchNorm2d(3, momentum=None), torch.zeros(2, 3, 2, 2))


LAYERS = [
    nn.Conv1d(3, 4, 3, stride=2, padding=1),
    nn.Conv3d(3, 2, 2, bias=False),
    nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1, output_padding=1),
    nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=1),
    nn.ConvTranspose2d(3, 2, 3, stride=1, padding=2, dilation=2),
    nn.ConvTranspose3d(3, 2, 2, stride=2, bias=False),
    nn.Linear(5, 3, bias=False),
]
SHAPES = [(2, 3, 9), (2, 3, 4, 4, 4), (2, 3, 5), (2, 4, 4, 4), (2, 3, 5, 5), (2, 3, 2, 2, 2), (2, 5)]


@pytest.mark.parametrize(("layer", "shape"), list(zip(LAYERS, SHAPES, strict=True)), ids=lambda v: type(v).__name__)
def test_lower_precision_by_hand_is_the_layer_under_autocast(layer, shape):
    """Alone (no vmap) the casts written out give exactly what autocast gives the layer: same shape,
    same bf16 values; without autocast, the layer's own float32 forward."""
    layer = copy.deepcopy(layer)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(CF.lower_precision_by_hand(layer, x), layer(x), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = CF.lower_precision_by_hand(layer, x), layer(x)
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_steps_are_grouped_by_batch_size():
    a, b = list(range(4)), list(range(2))
    batches = [[a, a, b], [a, b], [a, a, a, b], [a]]
    assert CF._rows_by_batch_size(batches, 0) == [[0, 1, 2, 3]]
    assert CF._rows_by_batch_size(batches, 1) == [[0, 2], [1]]
    assert CF._rows_by_batch_size(batches, 2) == [[0], [2]]
    assert CF._rows_by_batch_size(batches, 3) == [[2]]
    assert CF._rows_by_batch_size(batches, 4) == []


def test_folds_side_by_side_share_one_param_group_and_one_learning_rate():
    def opt(lr, groups=1):
        params = [nn.Parameter(torch.zeros(1)) for _ in range(groups)]
        return torch.optim.SGD([{"params": [p]} for p in params], lr=lr, momentum=0.9, weight_decay=1e-4)

    hyper = CF._shared_hyperparameters([opt(0.1), opt(0.1)])
    assert "params" not in hyper and (hyper["lr"], hyper["momentum"], hyper["weight_decay"]) == (0.1, 0.9, 1e-4)
    with pytest.raises(
        NodulekitError, match=r"^internal: folds side by side must be at the same epoch \(same learning rate\)$"
    ):
        CF._shared_hyperparameters([opt(0.1), opt(0.1), opt(0.01)])
    with pytest.raises(
        NodulekitError, match=r"^internal: side-by-side folds expect one parameter group per optimiser$"
    ):
        CF._shared_hyperparameters([opt(0.1), opt(0.1, groups=2)])


def test_a_model_drawing_random_numbers_is_refused_by_its_name():
    plain = nn.Sequential(nn.Linear(2, 2), nn.Dropout2d(0.1), nn.Dropout(0.5), nn.AlphaDropout(0.1))
    assert CF.refusal(plain) == (
        "Sequential draws random numbers in training (AlphaDropout, Dropout, Dropout2d), "
        "so its folds side by side could not match folds trained alone"
    )
    plain.arch = "mine"
    assert CF.refusal(plain).startswith("mine draws random numbers in training (")
    assert CF.refusal(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))) is None

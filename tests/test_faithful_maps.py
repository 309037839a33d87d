"""The faithful SAM/HESAM map: its sum plus the stated constants is the class score, exactly."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


def random_model(arch: str, seed: int = 0, dtype=torch.float64, **options):
    """A registry model with every weight randomised and BatchNorm statistics from random batches."""
    from nodulekit.models import create_model

    torch.manual_seed(seed)
    model = create_model(arch, 3, base_width=4, **options).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.15 * torch.randn_like(p))
        model.train()
        for _ in range(3):
            model(torch.rand(8, 3, 32, 32, dtype=dtype))
    return model.eval()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("arch,options", [("sam", {}), ("hesam", {}), ("hesam", {"fusion": "concat"})])
def test_faithful_map_sums_to_the_logit(arch, options, dtype, tol):
    model = random_model(arch, seed=1, dtype=dtype, **options)
    x = torch.rand(6, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        out = model.forward_features(x)
        maps, offset = model.head.faithful_map(out["features"], out["high_level"])
    logits = out["logits"]
    assert maps.shape == (6, 2, 16, 16)
    torch.testing.assert_close(maps.sum(dim=(2, 3)) + offset, logits, rtol=0, atol=tol)
    # the constants, written out from the parameters (not from faithful_map's own arithmetic)
    head = model.head
    k = head.channels
    const = head.fc.weight[:, :k] @ head.beta_bias + head.fc.bias
    if head.fusion == "sum":
        const = const + out["high_level"] @ head.fc.weight[:, :k].T
    elif head.fusion == "concat":
        const = const + out["high_level"] @ head.fc.weight[:, k:].T
    torch.testing.assert_close(offset, const.expand_as(offset), rtol=0, atol=tol)
    # non-trivial: scores differ between inputs, and the paper's Eq. 7/11 map does not sum to them
    assert logits[:, 1].std() > 1e-2
    eq7 = torch.einsum("ck,bkhw->bchw", head.gamma, out["features"])
    assert (eq7.sum(dim=(2, 3)) + offset - logits).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["sam", "hesam"])
def test_unpooled_last_row_and_column_get_exactly_zero(arch):
    model = random_model(arch, seed=2)
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        out = model.forward_features(x)
        maps, _ = model.head.faithful_map(out["features"], out["high_level"])
        g = out["features"].clone()
        g[..., 15, :] += 5.0
        g[..., :, 15] -= 3.0
        moved = model.head(g, out["high_level"])["logits"]
    assert torch.all(maps[..., 15, :] == 0) and torch.all(maps[..., :, 15] == 0)
    assert (maps[..., :15, :15] != 0).float().mean() > 0.99
    torch.testing.assert_close(moved, out["logits"], rtol=0, atol=1e-12)  # g there never reaches the score


def test_pooling_weights_are_the_gradient_of_the_pooled_vector():
    """w_k(x, y) = dH_k / dg_k(x, y), by autograd through the head's own AvgPool + per-map FC."""
    head = random_model("sam", seed=3).head
    g = torch.rand(1, head.channels, 16, 16, dtype=torch.float64, requires_grad=True)
    h = head.final_feature_vector(g)[0]
    for k in (0, head.channels // 2, head.channels - 1):
        (grad,) = torch.autograd.grad(h[k], g, retain_graph=True)
        torch.testing.assert_close(head.pooling_weights()[k], grad[0, k], rtol=0, atol=1e-14)
        assert torch.all(grad[0, torch.arange(head.channels) != k] == 0)


def test_max_pooled_head_has_no_faithful_map():
    model = random_model("sam", seed=4, fcf_pool="max")
    with pytest.raises(ValueError, match="not a linear function"):
        model.head.pooling_weights()


# ---- as map methods: `sam-faithful`, `hesam-faithful` ---------------------------------


@pytest.mark.parametrize("arch", ["sam", "hesam"])
def test_faithful_map_method_decomposes_the_logits(arch):
    import numpy as np

    from nodulekit.maps import compute_maps

    model = random_model(arch, seed=5, dtype=torch.float32)
    x = np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32)
    out = compute_maps(model, x, f"{arch}-faithful", batch_size=2, device="cpu")
    head = model.head
    with torch.no_grad():
        feats = model.forward_features(torch.from_numpy(x))
        gamma = head.fc.weight[:, : head.channels]
        offset = gamma @ head.beta_bias + head.fc.bias
        if head.fusion is not None:  # HESAM's high-level term, sum_k gamma_k^c d_k
            offset = offset + feats["high_level"] @ gamma.T
    np.testing.assert_allclose(out["maps"].sum(axis=(2, 3)) + offset.numpy(), out["logits"], rtol=0, atol=1e-5)
    paper = compute_maps(model, x, arch, device="cpu")  # Eq. 7 / 11, kept as it was
    np.testing.assert_allclose(paper["logits"], out["logits"], rtol=1e-6, atol=1e-6)
    assert np.abs(paper["maps"] - out["maps"]).max() > 1e-3


def test_faithful_map_methods_apply_only_to_average_pooled_sam_heads():
    from nodulekit.errors import NodulekitError
    from nodulekit.maps import check_method, supported_methods

    assert "sam-faithful" in supported_methods(random_model("sam")) and "hesam-faithful" not in supported_methods(
        random_model("sam")
    )
    assert "hesam-faithful" in supported_methods(random_model("hesam"))
    assert not {"sam-faithful", "hesam-faithful"} & set(supported_methods(random_model("cam")))
    with pytest.raises(NodulekitError, match=r"fcf_pool=max\), which is not linear in g") as info:
        check_method(random_model("sam", fcf_pool="max"), "sam-faithful")
    assert "\n" not in str(info.value)


def test_faithful_map_adds_up_under_bf16_autocast():
    """The head runs in fp32 even when the backbone runs in bf16: the decomposition stays exact."""
    import numpy as np

    from nodulekit.execution import ExecutionChoice
    from nodulekit.maps import compute_maps

    model = random_model("sam", seed=6, dtype=torch.float32)
    x = np.random.default_rng(1).random((4, 3, 32, 32), dtype=np.float32)
    bf16 = ExecutionChoice(device="cpu", amp=True, channels_last=False, how="forced", reason="test")
    out = compute_maps(model, x, "sam-faithful", device="cpu", execution=bf16)
    head = model.head
    with torch.no_grad():
        offset = (head.fc.weight[:, : head.channels] @ head.beta_bias + head.fc.bias).numpy()
    np.testing.assert_allclose(out["maps"].sum(axis=(2, 3)) + offset, out["logits"], rtol=0, atol=1e-5)
    fp32 = compute_maps(model, x, "sam-faithful", device="cpu")
    assert np.abs(out["logits"] - fp32["logits"]).max() > 0  # the backbone did run in bf16

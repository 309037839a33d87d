"""Grad-CAM on heads that are non-linear in g: each image's weights come from its own gradient.

With a head linear in the feature maps g (every CAM/SAM test model), d y^c / d g is the same
for every image, so "batched equals per-image" holds even if the weights were averaged over
the batch. Here the head is non-linear in g (tanh layer; VGG16's ReLU classifier), so each
image has its own gradient, and the reference is Grad-CAM written out with autograd one
image at a time (Eq. 3-4), without the library's hooks or batching.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nodulekit import maps as M

torch.set_num_threads(1)


class TanhHeadNet(nn.Module):
    """conv -> g [B, 6, 8, 8] -> GAP -> tanh(A h + a) -> logits = B z + b (non-linear in g)."""

    def __init__(self, channels: int = 3, k: int = 6):
        super().__init__()
        self.arch, self.in_channels, self.num_classes, self.map_kind = "tanh-head", channels, 2, None
        self.config = {}
        self.body = nn.Sequential(
            nn.Conv2d(channels, k, 3, padding=1),
            nn.BatchNorm2d(k),
            nn.ReLU(),
            nn.Conv2d(k, k, 3, stride=4, padding=1),
        )
        self.feature_layer = self.body
        self.hidden = nn.Linear(k, 5)
        self.out = nn.Linear(5, 2)
        with torch.no_grad():  # steep enough that tanh's slope differs from image to image
            self.hidden.weight.mul_(10.0)

    def head(self, g):
        return self.out(torch.tanh(3.0 * self.hidden(g.mean(dim=(2, 3)))))

    def forward_features(self, x):
        g = self.body(x)
        return {"logits": self.head(g), "features": g, "high_level": None}

    def forward(self, x):
        return self.forward_features(x)["logits"]


def _eval_model(seed: int) -> TanhHeadNet:
    torch.manual_seed(seed)
    model = TanhHeadNet()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 3, 32, 32))
    return model.eval()


def _inputs(n: int = 8, seed: int = 0) -> np.ndarray:
    # Images of very different brightness push tanh to different slopes, so gradients differ.
    rng = np.random.default_rng(seed)
    return (rng.random((n, 3, 32, 32)) * np.linspace(0.2, 3.0, n)[:, None, None, None]).astype(np.float32)


def per_image_gradcam(features, head, x: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """(maps [N, h, w], alphas [N, K]): Grad-CAM of class c, one image per autograd call."""
    maps, alphas = [], []
    for i in range(len(x)):
        with torch.no_grad():
            g = features(torch.from_numpy(x[i : i + 1]))
        g = g.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(head(g)[0, c], g)
        alpha = grad[0].mean(dim=(1, 2))  # Eq. 3: global average of the gradient over the map
        cam = torch.relu((alpha[:, None, None] * g[0]).sum(0))  # Eq. 4
        maps.append(cam.detach().numpy())
        alphas.append(alpha.numpy())
    return np.stack(maps), np.stack(alphas)


def test_fixture_gradients_really_differ_between_images():
    # Otherwise the tests below could not tell per-image weights from batch-averaged ones.
    model = _eval_model(0)
    x = _inputs()
    for c in (0, 1):
        _, alphas = per_image_gradcam(model.body, model.head, x, c)
        spread = np.abs(alphas - alphas.mean(0)).max()
        assert spread > 0.2 * np.abs(alphas).max(), (c, alphas)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_gradcam_of_a_nonlinear_head_equals_the_per_image_reference(batch_size):
    model = _eval_model(1)
    x = _inputs()
    out = M.compute_maps(model, x, "gradcam", batch_size=batch_size, device="cpu")
    for c in (0, 1):
        ref, _ = per_image_gradcam(model.body, model.head, x, c)
        assert np.abs(ref).max() > 1e-3
        np.testing.assert_allclose(out["maps"][:, c], ref, rtol=1e-4, atol=1e-6)


def test_an_images_map_does_not_depend_on_the_rest_of_its_batch():
    model = _eval_model(2)
    x = _inputs()
    alone = M.compute_maps(model, x[:1], "gradcam", device="cpu")["maps"][0]
    others = _inputs(seed=5)
    others[0] = x[0]
    for batch in (x, others, np.concatenate([x[:1], x[:1] * 0.1])):
        with_others = M.compute_maps(model, batch, "gradcam", batch_size=len(batch), device="cpu")["maps"][0]
        np.testing.assert_allclose(with_others, alone, rtol=1e-4, atol=1e-6)


def test_registry_vgg16_plain_gradcam_equals_the_per_image_reference():
    """VGG16's classifier (max pool, FC-ReLU-FC-ReLU-FC) is non-linear in g."""
    from nodulekit.models import create_model

    torch.manual_seed(3)
    model = create_model("vgg16", 3, base_width=4, fc_width=16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.train()
        for _ in range(3):
            model(torch.rand(8, 3, 32, 32))
    model.eval()
    x = _inputs(6, seed=1)

    def features(xi):
        return model.backbone(xi)[0]

    def head(g):
        return model.classifier(model.pools[-1](g))

    out = M.compute_maps(model, x, "gradcam", batch_size=6, device="cpu")
    for c in (0, 1):
        ref, alphas = per_image_gradcam(features, head, x, c)
        assert np.abs(alphas - alphas.mean(0)).max() > 1e-3 * np.abs(alphas).max()
        np.testing.assert_allclose(out["maps"][:, c], ref, rtol=1e-4, atol=1e-6)

"""A new architecture is one registered factory: it trains, is reloaded from its checkpoint
and gives its own maps with no other change (docs/ARCHITECTURE.md, "Adding an architecture")."""

from __future__ import annotations

import numpy as np
import torch
from conftest import write_tiny_dataset

from nodulekit.models import registry
from nodulekit.models.base import NoduleClassifier
from nodulekit.models.heads import ClassifierHead

torch.set_num_threads(1)


class Tiny(NoduleClassifier):
    """The walkthrough's example: one strided conv, then a SAM head."""

    def __init__(self, in_channels, num_classes, width):
        super().__init__(in_channels, num_classes)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(in_channels, width, 3, stride=2, padding=1), torch.nn.ReLU())
        self.head = ClassifierHead(width, num_classes, pool="sam", feature_size=16)
        self.map_kind = self.head.map_kind

    @property
    def feature_layer(self):
        return self.body

    def backbone(self, x):
        return self.body(x), None  # (g, bottleneck maps for d or None)


def test_a_registered_architecture_trains_reloads_and_maps(tmp_path, monkeypatch):
    from nodulekit.maps import compute_maps, supported_methods
    from nodulekit.run import Run
    from nodulekit.training import TrainConfig, train

    registry._load_families()  # before the copy: loading into the copy would leave the real registry empty
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # leave the real registry alone

    @registry.register_model("tiny-sam", "one conv + SAM head", map_kind="sam")
    def tiny_sam(in_channels, num_classes=2, *, width=8):
        return Tiny(in_channels, num_classes, width)

    assert "tiny-sam" in registry.available_models()
    ds = write_tiny_dataset(tmp_path / "d3c.h5", n=20, channels=3, folds=2)
    cfg = TrainConfig(arch="tiny-sam", epochs=1, batch_size=8, lr=0.01, device="cpu", amp=False, channels_last=False)
    train(ds, tmp_path / "run", cfg, folds=[0], progress=False)
    run = Run(tmp_path / "run")
    model, ckpt = run.load_model(0)
    assert isinstance(model, Tiny) and ckpt["config"] == {"width": 8}
    assert {"gradcam", "sam"} <= set(supported_methods(model)) and "hesam" not in supported_methods(model)
    result = run.fold_result(0)
    x = run.load_dataset().x[result.test_index]
    out = compute_maps(model, x, "sam", device="cpu")
    # the reloaded model reproduces the probabilities training recorded, and its SAM maps are Eq. 7
    np.testing.assert_allclose(out["prob"], result.test_prob, rtol=0, atol=1e-5)
    with torch.no_grad():
        g = model.body(torch.from_numpy(x))
    np.testing.assert_allclose(
        out["maps"], torch.einsum("ck,bkhw->bchw", model.head.gamma, g).detach(), rtol=1e-4, atol=1e-6
    )

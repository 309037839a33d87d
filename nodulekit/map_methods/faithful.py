"""Faithful SAM/HESAM maps: the map whose sum over positions, plus constants, is the class score.

AvgPool (kernel 5, stride 2), each feature map's own FC layer (beta) and the classifier gamma
are all linear in the final features g, so S_c = sum_{x,y} F_c(x, y) + offset_c exactly, with
F_c = sum_k gamma_k^c w_k g_k and w_k = beta_k spread back through the pooling windows
(``ClassifierHead.faithful_map``; docs/maps.md). The paper's Eq. 7/11 maps (``sam``,
``hesam``) leave beta out and do not sum to the score; these are kept beside them.
"""

from __future__ import annotations

from nodulekit.map_methods import MapMethod, register_map_method


class FaithfulMap(MapMethod):
    """F_c from the model's own average-pooled SAM head; no map exists for a max-pooled one."""

    def supports(self, model):
        reason = super().supports(model)
        if reason is not None:
            return reason
        head = getattr(model, "head", None)
        if not hasattr(head, "faithful_map"):
            return f"{self.name} needs nodulekit's SAM head (its pooling weights spread back to g)"
        if getattr(head, "fcf_pool", "avg") != "avg":
            return (
                f"its SAM head max-pools the final features (fcf_pool={head.fcf_pool}), which is not linear in g, "
                "so no map sums to its score"
            )
        return None

    def maps(self, model, x):
        import torch

        out = model.forward_features(x)
        # fp32 (or the head's own fp64): never the bf16 of autocast, never a dtype the head lacks
        dtype = torch.float64 if model.head.fc.weight.dtype == torch.float64 else torch.float32
        g = out["features"].to(dtype)
        d = out["high_level"].to(dtype) if out["high_level"] is not None else None
        # The head again in fp32 even under bf16 autocast (cheap next to the backbone), so the
        # map and the logits it returns add up exactly for the features g the backbone gave.
        with torch.autocast(device_type=g.device.type, enabled=False):
            logits = model.head(g, d)["logits"]
            maps, _offset = model.head.faithful_map(g, d)
        return logits, maps


@register_map_method
class FaithfulSAM(FaithfulMap):
    name = "sam-faithful"
    description = "faithful SAM map: sum over positions + constants = the class score S'_c (Eq. 8-10)"
    equations = (8,)
    map_kind = "sam"


@register_map_method
class FaithfulHESAM(FaithfulMap):
    name = "hesam-faithful"
    description = "faithful HESAM map: sum over positions + constants = the class score S^h_c (Eq. 12)"
    equations = (12,)
    map_kind = "hesam"

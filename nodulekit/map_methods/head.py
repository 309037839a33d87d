"""Maps a model's own head defines: M_c = sum_k gamma_k^c g_k (CAM Eq. 2, SAM Eq. 7, HESAM Eq. 11)."""

from __future__ import annotations

from nodulekit.map_methods import MapMethod, register_map_method


class HeadMap(MapMethod):
    """The map is the model's ``activation_map``: the classifier weights of its head applied to g."""

    def maps(self, model, x):
        return model.activation_map(x)


@register_map_method
class CAM(HeadMap):
    name = "cam"
    description = "class activation map of a GAP head, Eq. 1-2"
    equations = (1, 2)
    map_kind = "cam"


@register_map_method
class HECAM(CAM):
    name = "he-cam"
    description = "CAM of a GAP head fed with the high-level feature too (Fig. 6)"
    high_level = True


@register_map_method
class SAM(HeadMap):
    name = "sam"
    description = "soft activation map M'_c, Eq. 7"
    equations = (7,)
    map_kind = "sam"


@register_map_method
class HESAM(HeadMap):
    name = "hesam"
    description = "high-level enhanced soft activation map M^h_c, Eq. 11"
    equations = (11,)
    map_kind = "hesam"

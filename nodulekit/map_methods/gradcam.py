"""Grad-CAM (Selvaraju et al. 2017; paper Eq. 3-4): gradient-weighted maps of any model."""

from __future__ import annotations

from nodulekit.map_methods import MapMethod, register_map_method


@register_map_method
class GradCAM(MapMethod):
    """alpha_k^c = spatial mean of d y^c / d g_k (Eq. 3); the base forms ReLU(sum_k alpha_k^c g_k) (Eq. 4)."""

    name = "gradcam"
    description = "gradient-weighted class activation map, Eq. 3-4"
    equations = (3, 4)
    needs_gradients = True

    def weights(self, g, grad):
        return grad.mean(dim=(2, 3))  # Eq. 3: GAP of the gradients


@register_map_method
class HEGradCAM(GradCAM):
    name = "he-gradcam"
    description = "Grad-CAM of a model with the high-level feature (Fig. 6)"
    high_level = True

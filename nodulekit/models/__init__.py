"""Every classifier of the paper behind one registry (see ``docs/models.md``).

>>> from nodulekit.models import create_model
>>> model = create_model("hesam", in_channels=11)
>>> logits, maps = model.activation_map(x)  # x: [B, 11, 32, 32]
"""

from nodulekit.models.base import NoduleClassifier
from nodulekit.models.heads import ClassifierHead
from nodulekit.models.registry import (
    available_models,
    create_model,
    describe_models,
    model_spec,
    register_model,
)

__all__ = [
    "ClassifierHead",
    "NoduleClassifier",
    "available_models",
    "create_model",
    "describe_models",
    "model_spec",
    "register_model",
]

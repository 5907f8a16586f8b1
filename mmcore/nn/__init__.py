"""Drop-in nn.Modules built on mmcore.ops."""
from .cross_modal import CoAttention, CrossModalAttention  # noqa: F401

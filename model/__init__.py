"""Models: the ``MODELS`` registry. Builders are imported only when a config names them."""

from util.registry import Registry

MODELS = Registry("model")
MODELS.register_lazy("mambaad", "model.mambaad.network:MambaAD")

"""Models: the ``MODELS`` registry. Builders are imported only when a config names them."""

from util.registry import Registry

MODELS = Registry("model")
MODELS.register_lazy("mambaad", "model.mambaad.network:MambaAD")
MODELS.register_lazy("rd4ad", "model.rd4ad.network:RD4AD")
MODELS.register_lazy("uniad", "model.uniad.network:UniAD")
MODELS.register_lazy("destseg", "model.destseg.network:DeSTSeg")
MODELS.register_lazy("simplenet", "model.simplenet.network:SimpleNet")

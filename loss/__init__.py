"""Training losses: the ``LOSSES`` registry."""

from util.registry import Registry

LOSSES = Registry("loss")
LOSSES.register_lazy("feature_mse", "loss.feature_mse:FeatureMSELoss")
LOSSES.register_lazy("feature_cos", "loss.feature_cos:FeatureCosineLoss")
# a method folder's own loss, named by its configs' loss.type
LOSSES.register_lazy("destseg", "model.destseg.loss:DeSTSegLoss")
LOSSES.register_lazy("truncated_l1", "loss.truncated_l1:TruncatedL1Loss")

"""Training losses: the ``LOSSES`` registry."""

from util.registry import Registry

LOSSES = Registry("loss")
LOSSES.register_lazy("feature_mse", "loss.feature_mse:FeatureMSELoss")
LOSSES.register_lazy("feature_cos", "loss.feature_cos:FeatureCosineLoss")
LOSSES.register_lazy("truncated_l1", "loss.truncated_l1:TruncatedL1Loss")

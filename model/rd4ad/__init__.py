"""RD4AD (Deng & Li, CVPR 2022): reverse distillation from a frozen WideResNet50-2 teacher into a
mirrored decoder through a one-class bottleneck, as ADer's benchmark runs it (``model/rd.py``)."""

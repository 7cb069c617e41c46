"""DeSTSeg (Zhang et al., CVPR 2023): a denoising student learns a frozen ResNet18 teacher's features
of clean images from synthetically damaged ones, then a segmentation network learns the defect
masks from the teacher-student feature products, as ADer's benchmark runs it (``model/destseg.py``,
``trainer/destseg_trainer.py``)."""

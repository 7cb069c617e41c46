"""MambaAD (Mamba anomaly detection): a frozen CNN teacher, the Half-FPN bottleneck and the Mamba
decoder, with its scan orders and the authors' checkpoint naming. Registered in ``MODELS`` as
``mambaad`` (:class:`model.mambaad.network.MambaAD`)."""

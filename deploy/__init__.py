"""Deployment: export the whole inference path (``deploy.export``, needs torch) and run the exported
model without torch (``deploy.runtime``: onnxruntime or OpenVINO). See docs/deploy.md."""

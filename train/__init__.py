"""Training: the joint training loop of the experts (``python train/joint.py``)."""

"""PyTorch/HF/diffusers checkpoints <-> jfl params."""

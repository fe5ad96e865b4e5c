"""Training data: sources, preprocessing, mixing and packing into the batch layout of `jfl/batch.py`."""

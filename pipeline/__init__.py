"""Quick Fix Labels: repair a classifier trained with the wrong class order.

Stage 1 (`extract_features.py`) caches the frozen backbone's pooled features in a Zarr store,
stage 2 (`train_head.py`) trains only the final linear layer on them, stage 3
(`stitch_checkpoint.py`) writes the new head back into a copy of the checkpoint.
"""

__version__ = "0.1.0"

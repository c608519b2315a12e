"""Training: TorchRec models over the feature contract, sharded with DistributedModelParallel, run by Ray Train.

Three layers, as in TorchRec: ``modules/`` (unsharded building blocks), ``models/`` (one reference model per
file) and ``distributed/`` (sharding plans and the DMP wrapping). ``data`` reads the Parquet exports,
``metrics`` scores predictions and ``train`` is the stage command (``python -m training.train --model deepfm``).
"""

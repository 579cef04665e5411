"""Training helpers: batches and steps (`loop`), gradient accumulation, DCP checkpoints (`dcp`),
global-norm clipping and expert-load routing bias."""

from moefn.train.loop import Batch, global_batch, local_batch, train, train_step

__all__ = ["Batch", "global_batch", "local_batch", "train", "train_step"]

"""Training: the packed-batch losses, the sharded train step, and the resumable loop.

  from jfl.train import train          # train(config, workdir) -> {"state", "history", "status"}
"""

from jfl.train.loop import train
from jfl.train.state import TrainState
from jfl.train.step import StepSettings, train_step

__all__ = ["StepSettings", "TrainState", "train", "train_step"]

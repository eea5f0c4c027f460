"""Training: the one loop (`loop`), building its inputs (`prepare`), optimizer and schedule, distributed engines,
alerts."""

from lmlab.training.loop import TrainResult, resume_run, train

__all__ = ["TrainResult", "resume_run", "train"]

"""The DeepSpeed learner group: Ray actors forming one torch.distributed group per model.

`LearnerGroup` is what the driver uses; `LearnerWorker` is one rank of it (a Ray actor).
"""

from .group import LearnerGroup
from .worker import LearnerSpec, LearnerWorker

__all__ = ["LearnerGroup", "LearnerSpec", "LearnerWorker"]

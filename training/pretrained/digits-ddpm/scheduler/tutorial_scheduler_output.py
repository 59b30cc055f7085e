"""What every scheduler of this project returns from `step`: diffusers' `SchedulerOutput` shape, one class for all five.

A leaf: it imports no sibling, so every `scheduling_tutorial_*.py` file can import it side by side with its base
module and the math (`from .tutorial_scheduler_output import TutorialSchedulerOutput`), never from another sampler.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from diffusers.utils import BaseOutput


@dataclass
class TutorialSchedulerOutput(BaseOutput):
    """Output of a scheduler step.

    Args:
        prev_sample (`torch.Tensor`): x_{t'}, the sample at the grid's next (less noisy) timestep.
        pred_original_sample (`torch.Tensor`): x̂_0, the model's estimate of the clean sample (after clipping).
    """

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None

"""The tutorial's math as diffusers schedulers: DDPM, DDIM and the shared noise-schedule module."""

from . import tutorial_math
from .scheduling_tutorial_ddim import TutorialDDIMScheduler
from .scheduling_tutorial_ddpm import TutorialDDPMScheduler, TutorialSchedulerOutput

__all__ = ["TutorialDDIMScheduler", "TutorialDDPMScheduler", "TutorialSchedulerOutput", "tutorial_math"]

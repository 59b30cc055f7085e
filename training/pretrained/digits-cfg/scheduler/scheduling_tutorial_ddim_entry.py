"""Loader entry for `TutorialDDIMScheduler`, written by save_pretrained.

diffusers fetches a remote module's siblings only when they are imported as `from .name import ...`; this
file names every file `scheduling_tutorial_ddim.py` needs that way, so that all of them are fetched.
"""

from diffusers import ConfigMixin, SchedulerMixin  # noqa: F401

from .scheduling_tutorial_ddim import TutorialDDIMScheduler  # noqa: F401
from .scheduling_tutorial_ddpm import __name__ as _scheduling_tutorial_ddpm_module  # noqa: F401
from .tutorial_discrete_base import __name__ as _tutorial_discrete_base_module  # noqa: F401
from .tutorial_math import __name__ as _tutorial_math_module  # noqa: F401

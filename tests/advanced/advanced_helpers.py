"""Helpers of the advanced-sampler tests: exact Gaussian-mixture problems and reference PF-ODE solutions.

The sampling loop is the library's `custom_pipelines.sample_loop`, exactly as a pipeline runs it.
"""

import torch

from schedulers import TutorialDDPMScheduler
from schedulers.scheduling_tutorial_pf_ode import solve_pf_ode

# Reference solutions: Dormand–Prince at rtol = atol = 1e-10; its own error (vs 1e-8) is ~1e-8, far below every
# sampler error the order fits use (>= 1e-6).
REFERENCE_TOL = 1e-10


class Problem:
    """A mixture, its exact model for a schedule, starting noise and the reference PF-ODE sample."""

    def __init__(self, gmm, beta_schedule="linear", batch=64, prediction_type="epsilon", seed=0):
        self.gmm = gmm
        self.ddpm = TutorialDDPMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type)
        self.model = gmm.model(self.ddpm.alpha_bar, prediction_type)
        g = torch.Generator().manual_seed(seed)
        self.x_T = torch.randn(batch, gmm.dim, generator=g, dtype=torch.float64)
        self._reference = None

    def reference(self, scheduler):
        if self._reference is None:
            solution = solve_pf_ode(
                self.model, scheduler, self.x_T, rtol=REFERENCE_TOL, atol=REFERENCE_TOL, max_evals=50000
            )
            self._reference = solution.sample
        return self._reference

    def error(self, x, scheduler):
        """Mean Euclidean distance to the reference sample, per point."""
        return float((x - self.reference(scheduler)).pow(2).sum(1).sqrt().mean())

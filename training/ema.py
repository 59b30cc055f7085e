"""The exponential moving average (EMA) of a model's weights: the weights a trained pipeline ships.

The decay follows the warm-up schedule of diffusers' `EMAModel` with `use_ema_warmup=True` (after Karras et al.
2022's observation that early averages must forget fast): at update k,

    decay_k = 0                                             for k = 1
    decay_k = min(max_decay, 1 - (1 + (k - 1) / inv_gamma) ** -power)   afterwards,

and the shadow weights move as s <- s + (1 - decay_k) (p - s), one fused `lerp` over all tensors. The shadow weights
are created from the parameters they follow, so they live on the same device and dtype (DESIGN: device is a
property of the data); a checkpoint's tensors are copied into them, never swapped for CPU tensors.
"""

import contextlib
from typing import Dict, Iterable, List

import torch


class EMA:
    """Shadow copies of `parameters`, updated after every optimizer update.

    Args:
        parameters (`Iterable[torch.nn.Parameter]`): the weights to follow; the shadows start as copies of them.
        max_decay (`float`, defaults to 0.9999): the largest decay, reached after the warm-up.
        inv_gamma (`float`, defaults to 1.0): time scale of the warm-up.
        power (`float`, defaults to 3/4): exponent of the warm-up.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], max_decay=0.9999, inv_gamma=1.0, power=0.75):
        self.shadow_params: List[torch.Tensor] = [p.detach().clone() for p in parameters]
        self.max_decay, self.inv_gamma, self.power = float(max_decay), float(inv_gamma), float(power)
        self.optimization_step = 0
        self.last_decay = 0.0
        self._stored: List[torch.Tensor] = []

    def decay(self, optimization_step: int) -> float:
        """decay_k of the warm-up schedule (module docstring) for update k = `optimization_step`."""
        k = optimization_step - 1
        if k <= 0:
            return 0.0
        return min(self.max_decay, 1.0 - (1.0 + k / self.inv_gamma) ** -self.power)

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Move the shadows towards `parameters` by 1 - decay_k (one fused update, no host synchronisation)."""
        self.optimization_step += 1
        self.last_decay = self.decay(self.optimization_step)
        torch._foreach_lerp_(self.shadow_params, [p.detach() for p in parameters], 1.0 - self.last_decay)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Write the shadow weights into `parameters`."""
        torch._foreach_copy_([p.data for p in parameters], self.shadow_params)

    @contextlib.contextmanager
    def applied_to(self, parameters: Iterable[torch.nn.Parameter]):
        """Temporarily replace `parameters` by the shadow weights (for sampling and export); restored on exit."""
        parameters = list(parameters)
        saved = [p.detach().clone() for p in parameters]
        self.copy_to(parameters)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in parameters], saved)

    def tensors(self) -> Dict[str, torch.Tensor]:
        """The shadow weights by position, for a safetensors file."""
        return {str(i): s for i, s in enumerate(self.shadow_params)}

    def state(self) -> Dict:
        """The non-tensor state, for a JSON file (the decay settings come from the flags of the run)."""
        return {"optimization_step": self.optimization_step}

    @torch.no_grad()
    def load(self, tensors: Dict[str, torch.Tensor], state: Dict) -> None:
        """Restore from `tensors()` and `state()`: values are copied into the shadows, which keep their device."""
        if len(tensors) != len(self.shadow_params):
            raise ValueError(f"the EMA has {len(self.shadow_params)} tensors, the checkpoint {len(tensors)}.")
        for i, shadow in enumerate(self.shadow_params):
            saved = tensors[str(i)]
            if saved.shape != shadow.shape:
                raise ValueError(f"EMA tensor {i} has shape {tuple(saved.shape)}, expected {tuple(shadow.shape)}.")
            shadow.copy_(saved)
        self.optimization_step = int(state["optimization_step"])

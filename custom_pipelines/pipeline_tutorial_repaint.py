"""RePaint inpainting (Lugmayr et al., arXiv:2201.09865, Algorithm 1) with an unconditional UNet2DModel.

At every level the known pixels are drawn from the forward marginal q(x_t | x_0) of the input image (eq. (8)), the
unknown ones from the model's reverse step (eq. (9)), and the two are joined with the mask (eq. (10)). To let the
generated part agree with the known part, the sampler goes back up `jump_length` levels with the forward kernel
q(x_t | x_{t'}) (eq. (11)) `jump_n_sample - 1` times at every `jump_length`-th level ("resampling", Sec. 4.2) and
denoises again. The last level is x_0 itself, so the known region of the output is the input, exactly.

This file is shipped inside saved pipeline folders: it imports only torch, diffusers and its sibling
`tutorial_pipeline_*.py` files.
"""

import math
from typing import List, Optional, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers.utils.torch_utils import randn_tensor

# diffusers' remote-code loader copies only the sibling files this file imports, one level deep (DESIGN.md, "Loading
# facts"), so the files `TutorialPipelineBase` is built from are imported here too.
from .tutorial_pipeline_folder import MODEL_INDEX  # noqa: F401
from .tutorial_pipeline_loading import TutorialLoadingMixin  # noqa: F401
from .tutorial_pipeline_saving import TutorialSavingMixin  # noqa: F401
from .tutorial_pipeline_utils import ImageInput, TutorialPipelineBase, TutorialPipelineOutput

MaskInput = Union[torch.Tensor, np.ndarray, PIL.Image.Image]


def repaint_levels(num_inference_steps: int, jump_length: int, jump_n_sample: int) -> List[int]:
    """The levels RePaint visits, from N (x at the grid's first, noisiest timestep) down to 0 (x_0).

    Each move is ±1: down is a reverse step, up is forward re-noising. On reaching a level n = 0, j, 2j, ... (n < N - j,
    j = `jump_length`) the walk goes back up j levels, `jump_n_sample - 1` times in all for that n: RePaint's
    `get_schedule_jump` (the same sequence as diffusers' `RePaintScheduler.timesteps`, in units of grid steps).
    """
    jumps_left = {n: jump_n_sample - 1 for n in range(0, num_inference_steps - jump_length, jump_length)}
    level, levels = num_inference_steps, [num_inference_steps]
    while level > 0:
        level -= 1
        levels.append(level)
        if jumps_left.get(level, 0) > 0:
            jumps_left[level] -= 1
            for _ in range(jump_length):
                level += 1
                levels.append(level)
    return levels


class TutorialRePaintPipeline(TutorialPipelineBase):
    """Inpaint the masked-out region of images with an unconditional `UNet2DModel` (RePaint).

    Args:
        unet (`UNet2DModel`): the unconditional denoiser.
        scheduler (`SchedulerMixin`): a variance-preserving, order-1 scheduler whose `step` depends only on
            (t, x_t), with `add_noise` and `alphas_cumprod`: this project's `TutorialDDPMScheduler` (the usual
            choice) or `TutorialDDIMScheduler`, or diffusers' `DDPMScheduler`.
    """

    _pipeline_tag = "image-to-image"
    _card_tags = TutorialPipelineBase._card_tags + ("inpainting", "repaint")
    _card_example_call = "image=image, mask_image=mask, num_inference_steps={steps}"

    def check_scheduler(self) -> None:
        sched = self.scheduler
        ok = (
            getattr(sched, "order", 1) == 1
            and callable(getattr(sched, "add_noise", None))
            and getattr(sched, "alphas_cumprod", None) is not None
            and float(sched.init_noise_sigma) == 1.0
        )
        if not ok:
            raise ValueError(
                f"scheduler={type(sched).__name__} cannot drive RePaint: it needs a variance-preserving order-1 "
                "scheduler with add_noise and alphas_cumprod (TutorialDDPMScheduler, TutorialDDIMScheduler, "
                "DDPMScheduler)."
            )

    def preprocess_mask(self, mask_image: MaskInput, image_shape) -> torch.Tensor:
        """A binary mask (1 = known pixel, kept; 0 = generated) of shape (1 or B, 1 or C, H, W)."""
        if isinstance(mask_image, PIL.Image.Image):
            mask_image = np.asarray(mask_image.convert("L"), dtype=np.float32) / 255.0
        mask = torch.as_tensor(np.asarray(mask_image) if isinstance(mask_image, np.ndarray) else mask_image)
        if not torch.is_tensor(mask):
            raise ValueError(f"mask_image must be a tensor, an array or a PIL image; got {type(mask_image).__name__}.")
        if mask.ndim not in (2, 3, 4):
            raise ValueError(
                f"mask_image has {mask.ndim} dimensions (shape {tuple(mask.shape)}); allowed shapes: (H, W), "
                "(1 or C, H, W) and (1 or B, 1 or C, H, W)."
            )
        mask = mask.float()
        while mask.ndim < 4:
            mask = mask[None]
        b, c, h, w = image_shape
        if mask.shape[-2:] != (h, w) or mask.shape[0] not in (1, b) or mask.shape[1] not in (1, c):
            raise ValueError(
                f"mask_image has shape {tuple(mask.shape)} but image has shape {tuple(image_shape)}; the mask must be "
                f"(H, W) = ({h}, {w}), (1 or B, 1 or C, H, W)."
            )
        values = torch.unique(mask)
        if not bool(((values == 0) | (values == 1)).all()):
            raise ValueError(
                f"mask_image must be binary (1 = keep, 0 = inpaint); got values in [{values.min().item():g}, "
                f"{values.max().item():g}] such as {values[(values != 0) & (values != 1)][:3].tolist()}. We do not "
                "threshold silently: pass (mask > 0.5).float() if that is what you mean."
            )
        return mask.to(device=self._execution_device, dtype=self.unet.dtype)

    def _alpha_bar(self, t: int) -> float:
        """ᾱ_t from the scheduler (float64 `alpha_bar` when it has one); ᾱ = 1 at the x_0 level t = -1."""
        if t < 0:
            return 1.0
        table = getattr(self.scheduler, "alpha_bar", None)
        table = table if table is not None else self.scheduler.alphas_cumprod
        return float(table[t])

    def _timesteps_by_level(self, num_inference_steps: int, device) -> Tuple[List[int], List[Optional[torch.Tensor]]]:
        """Set the grid t_1 > ... > t_N and index it by level: level n holds x at t_{N-n+1}, level 0 is x_0 (t = -1).

        Args:
            num_inference_steps (`int`): N.
            device (`torch.device`): where the UNet and `add_noise` read the timesteps.

        Returns:
            `(timesteps, timesteps_on_device)`: level n's timestep as an int, and as a shape-(1,) view of the grid
            copied once to `device` (None at level 0).
        """
        self.scheduler.set_timesteps(num_inference_steps)  # on the host (see TutorialUnconditionalPipeline)
        grid = [int(t) for t in self.scheduler.timesteps]
        grid_on_device = self.scheduler.timesteps.to(device)
        if len(grid) != num_inference_steps:
            raise ValueError(
                f"scheduler={type(self.scheduler).__name__} made {len(grid)} timesteps for N = "
                f"{num_inference_steps}; RePaint needs one per step."
            )
        N = num_inference_steps
        timesteps = [-1] + [grid[N - level] for level in range(1, N + 1)]
        timesteps_on_device = [None] + [grid_on_device[N - level : N - level + 1] for level in range(1, N + 1)]
        return timesteps, timesteps_on_device

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        mask_image: MaskInput,
        num_inference_steps: int = 250,
        jump_length: int = 10,
        jump_n_sample: int = 10,
        eta: float = 0.0,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Union[TutorialPipelineOutput, tuple]:
        """Fill in the region where `mask_image` is 0.

        Args:
            image (`torch.Tensor`, `np.ndarray` or PIL images): the images, in [0, 1], shape as the UNet's samples.
            mask_image (`torch.Tensor`, `np.ndarray` or PIL image): binary, 1 = known (kept), 0 = inpainted; shape
                (H, W), (1 or C, H, W) or (1 or B, 1 or C, H, W). Non-binary masks raise (we do not threshold
                silently).
            num_inference_steps (`int`, defaults to 250): N, the grid's length.
            jump_length (`int`, defaults to 10): levels to go back up at each resampling (RePaint's j).
            jump_n_sample (`int`, defaults to 10): passes over each resampled stretch (RePaint's r); 1 = no
                resampling.
            eta (`float`, defaults to 0.0): passed to schedulers whose `step` takes it (DDIM).
            generator (`torch.Generator` or a list, *optional*): for x_T, the forward draws and the scheduler.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` or `"pt"`.
            return_dict (`bool`, defaults to `True`): return a `TutorialPipelineOutput` rather than a tuple.

        Returns:
            `TutorialPipelineOutput` or `(images,)`.
        """
        # 0. Validate at the door.
        self.check_scheduler()
        self.check_num_inference_steps(num_inference_steps)
        self.check_output_type(output_type)
        for name, value in (("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1.")
        x0 = self.preprocess_images(image, "image")
        mask = self.preprocess_mask(mask_image, x0.shape)
        batch_size = x0.shape[0]
        self.check_generator(generator, batch_size)

        # 1. Grid t_1 > ... > t_N, indexed by level.
        device = self._execution_device
        timesteps, timesteps_on_device = self._timesteps_by_level(num_inference_steps, device)

        def noise():
            return randn_tensor(x0.shape, generator=generator, device=device, dtype=x0.dtype)

        step_kwargs = self.scheduler_step_kwargs(eta=eta, generator=generator)
        levels = repaint_levels(num_inference_steps, jump_length, jump_n_sample)
        x = noise()  # x at level N, σ_init = 1 (variance-preserving)

        # 2. Walk the levels: down = reverse step joined with q(x_t | x_0) on the known region; up = re-noise.
        for i, (level, next_level) in enumerate(self.progress_bar(list(zip(levels[:-1], levels[1:])))):
            t, t_next = timesteps[level], timesteps[next_level]
            if next_level < level:
                model_output = self.unet(self.scheduler.scale_model_input(x, t), timesteps_on_device[level]).sample
                x_unknown = self.scheduler.step(model_output, t, x, **step_kwargs).prev_sample  # eq. (9)
                if t_next >= 0:  # eq. (8): known pixels from q(x_{t'} | x_0)
                    x_known = self.scheduler.add_noise(x0, noise(), timesteps_on_device[next_level])
                else:
                    x_known = x0  # ᾱ = 1: the input itself
                x = mask * x_known + (1 - mask) * x_unknown  # eq. (10)
                self.check_finite(x, model_output, i, t, len(levels) - 1)
            else:  # eq. (11): x_t ~ N(√(ᾱ_t/ᾱ_{t'}) x_{t'}, (1 - ᾱ_t/ᾱ_{t'}) I)
                ratio = self._alpha_bar(t_next) / self._alpha_bar(t)
                x = math.sqrt(ratio) * x + math.sqrt(1.0 - ratio) * noise()

        # 3. [-1, 1] -> images.
        images = self.postprocess(x, output_type)
        self.maybe_free_model_hooks()
        return TutorialPipelineOutput(images=images) if return_dict else (images,)

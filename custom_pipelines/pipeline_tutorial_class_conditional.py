"""Class-conditional generation with classifier-free guidance (Ho & Salimans, arXiv:2207.12598).

One `UNet2DModel` with `num_class_embeds = K + 1` is trained on labels 0..K-1 and, with some probability, on the null
label K = num_class_embeds - 1 (the unconditional branch). At sampling time the two predictions are mixed,
ε̃ = ε_u + w (ε_c - ε_u)   (CFG eq. (6), with w = 1 + their w),
which is linear in the model output, so the same mix applies to x_0- and v-predictions.

This file is shipped inside saved pipeline folders: it imports only torch, diffusers and its sibling
`tutorial_pipeline_*.py` files.
"""

from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

# diffusers' remote-code loader copies only the sibling files this file imports, one level deep (DESIGN.md, "Loading
# facts"), so the files `TutorialPipelineBase` is built from are imported here too.
from .tutorial_pipeline_folder import MODEL_INDEX  # noqa: F401
from .tutorial_pipeline_loading import TutorialLoadingMixin  # noqa: F401
from .tutorial_pipeline_saving import TutorialSavingMixin  # noqa: F401
from .tutorial_pipeline_utils import TutorialPipelineBase, TutorialPipelineOutput


def guided_output(out_uncond: torch.Tensor, out_cond: torch.Tensor, guidance_scale: float, channels: int):
    """ε̃ = ε_u + w (ε_c - ε_u) on the first `channels` channels; extra (learned-variance) channels from ε_c."""
    guided = out_uncond[:, :channels] + guidance_scale * (out_cond[:, :channels] - out_uncond[:, :channels])
    return torch.cat([guided, out_cond[:, channels:]], dim=1) if out_cond.shape[1] > channels else guided


class TutorialClassConditionalPipeline(TutorialPipelineBase):
    """Sample images of given classes from a class-conditional `UNet2DModel`, with classifier-free guidance.

    Args:
        unet (`UNet2DModel`): the denoiser, with `num_class_embeds = K + 1`; class K is the null (unconditional) class.
        scheduler (`SchedulerMixin`): any scheduler that fits a UNet2DModel.
    """

    _card_tags = TutorialPipelineBase._card_tags + ("class-conditional", "classifier-free-guidance")
    _card_example_call = "class_labels=[0, 1, 2, 3], guidance_scale=3.0, num_inference_steps={steps}"

    @property
    def null_class(self) -> int:
        """The label of the unconditional branch: `num_class_embeds - 1`."""
        return self.unet.config.num_class_embeds - 1

    def prepare_class_labels(self, class_labels, batch_size: Optional[int]) -> torch.Tensor:
        """Labels as a (B,) long tensor, checked against 0..K-1 (K = num_class_embeds - 1 real classes)."""
        num_embeds = self.unet.config.num_class_embeds
        if num_embeds is None or num_embeds < 2:
            raise ValueError(
                f"unet.config.num_class_embeds={num_embeds!r}: a class-conditional UNet2DModel needs num_class_embeds "
                "= number of classes + 1 (the last embedding is the null class of classifier-free guidance)."
            )
        if isinstance(class_labels, int):
            class_labels = [class_labels] * (batch_size or 1)
        labels = torch.as_tensor(class_labels)
        if labels.ndim != 1 or labels.numel() == 0 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"class_labels={class_labels!r} must be an int or a non-empty 1-D sequence of ints.")
        if batch_size is not None and labels.numel() != batch_size:
            raise ValueError(
                f"class_labels has {labels.numel()} labels but batch_size={batch_size}; give one per sample."
            )
        bad = labels[(labels < 0) | (labels >= self.null_class)]
        if bad.numel():
            raise ValueError(
                f"class_labels contains {bad.tolist()}; allowed labels are 0..{self.null_class - 1} "
                f"(label {self.null_class} is the null class, selected by guidance_scale=0)."
            )
        return labels.long().to(self._execution_device)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Union[int, Sequence[int], torch.Tensor],
        guidance_scale: float = 1.0,
        batch_size: Optional[int] = None,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        num_inference_steps: int = 50,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[..., Dict]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ("latents",),
        return_trajectory: bool = False,
    ) -> Union[TutorialPipelineOutput, tuple]:
        """Generate one sample per class label.

        Args:
            class_labels (`int`, `list[int]` or `torch.Tensor`): the class of each sample, in 0..num_class_embeds-2.
                An int is repeated `batch_size` times.
            guidance_scale (`float`, defaults to 1.0): w ≥ 0 in ε̃ = ε_u + w (ε_c - ε_u). w = 1 is the plain
                conditional model (one UNet call per step), w = 0 the unconditional one (one call), other values
                evaluate both branches in one batched call.
            batch_size (`int`, *optional*): number of samples; defaults to the number of labels.
            generator, latents, num_inference_steps, eta, output_type, return_dict, callback_on_step_end,
            callback_on_step_end_tensor_inputs, return_trajectory: as in `TutorialUnconditionalPipeline.__call__`.

        Returns:
            `TutorialPipelineOutput`, or a tuple when `return_dict=False`.
        """
        # 0. Validate at the door.
        if not isinstance(guidance_scale, (int, float)) or not guidance_scale >= 0:
            raise ValueError(f"guidance_scale={guidance_scale!r} must be a number >= 0 (1: no guidance).")
        labels = self.prepare_class_labels(class_labels, batch_size)
        batch_size = labels.numel()
        self.check_num_inference_steps(num_inference_steps)
        self.check_output_type(output_type)
        self.check_generator(generator, batch_size)
        tensor_inputs = self.resolve_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.check_callback_inputs(tensor_inputs)

        # 1. Grid, x_T, and the labels of each UNet call: one branch when w ∈ {0, 1}, else [null; c] batched.
        self.scheduler.set_timesteps(num_inference_steps)  # on the host (see TutorialUnconditionalPipeline)
        timesteps = self.scheduler.timesteps
        timesteps_on_device = timesteps.to(self._execution_device)
        latents = self.prepare_latents(batch_size, generator, latents)
        step_kwargs = self.scheduler_step_kwargs(eta=eta, generator=generator)
        null = torch.full_like(labels, self.null_class)
        both_branches = guidance_scale not in (0, 1)
        call_labels = torch.cat([null, labels]) if both_branches else (null if guidance_scale == 0 else labels)
        trajectory = [latents.cpu()] if return_trajectory else None
        pred_x0s: List[Optional[torch.Tensor]] = []

        # 2. Reverse process with the guided model output.
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_input = self.scheduler.scale_model_input(latents, t)
            if both_branches:
                out_u, out_c = self.unet(
                    torch.cat([model_input] * 2), timesteps_on_device[i], class_labels=call_labels
                ).sample.chunk(2)
                model_output = guided_output(out_u, out_c, guidance_scale, latents.shape[1])
            else:
                model_output = self.unet(model_input, timesteps_on_device[i], class_labels=call_labels).sample
            out = self.scheduler.step(model_output, t, latents, **step_kwargs)
            latents = self.finish_step(
                i, t, timesteps, out, model_output, trajectory, pred_x0s, callback_on_step_end, tensor_inputs, locals()
            )

        # 3. [-1, 1] -> images.
        images = self.postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        return self.pipeline_output(images, trajectory, pred_x0s, timesteps, return_trajectory, return_dict)

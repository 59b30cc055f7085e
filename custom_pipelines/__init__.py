"""DiffusionPipelines around a UNet2DModel, generic over schedulers, that save into self-contained folders."""

import schedulers  # noqa: F401  (our scheduler classes must be imported for `from_pretrained` without remote code)

from .pipeline_tutorial_class_conditional import TutorialClassConditionalPipeline
from .pipeline_tutorial_ddim_inversion import TutorialDDIMInversionPipeline, TutorialInversionOutput, slerp
from .pipeline_tutorial_img2img import TutorialImg2ImgPipeline
from .pipeline_tutorial_inverse_problem import TutorialInverseProblemPipeline
from .pipeline_tutorial_latent import TutorialLatentPipeline
from .pipeline_tutorial_repaint import TutorialRePaintPipeline
from .pipeline_tutorial_super_resolution import TutorialSuperResolutionPipeline
from .pipeline_tutorial_unconditional import TutorialUnconditionalPipeline
from .sampling_loop import sample_loop
from .tutorial_operators import (
    Blur,
    Colorization,
    Denoising,
    Inpainting,
    LinearOperator,
    OperatorSVD,
    RandomProjection,
    SuperResolution,
)
from .tutorial_pipeline_utils import OUTPUT_TYPES, TutorialPipelineBase, TutorialPipelineOutput

__all__ = [
    "OUTPUT_TYPES",
    "Blur",
    "Colorization",
    "Denoising",
    "Inpainting",
    "LinearOperator",
    "OperatorSVD",
    "RandomProjection",
    "SuperResolution",
    "TutorialClassConditionalPipeline",
    "TutorialDDIMInversionPipeline",
    "TutorialImg2ImgPipeline",
    "TutorialInverseProblemPipeline",
    "TutorialInversionOutput",
    "TutorialLatentPipeline",
    "TutorialPipelineBase",
    "TutorialPipelineOutput",
    "TutorialRePaintPipeline",
    "TutorialSuperResolutionPipeline",
    "TutorialUnconditionalPipeline",
    "sample_loop",
    "slerp",
]

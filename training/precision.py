"""Mixed precision: what `--mixed_precision` resolves to on this device, and float32 attention under CPU autocast."""

import os

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from schedulers import tutorial_math as tm
from training.errors import TrainingError

MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")


def uses_cpu() -> bool:
    """Whether accelerate will train on the CPU (`ACCELERATE_USE_CPU`, set by `accelerate launch --cpu`, or no GPU)."""
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()


def resolve_mixed_precision(requested: str, cpu: bool) -> str:
    """`--mixed_precision`: 'auto' -> 'bf16' where bf16 is native (CPU: AVX512-BF16 or AMX; CUDA: bf16), else 'no'.

    An explicit choice the device cannot honour stops here: 'fp16' on a CPU (accelerate's float16 loss scaling is
    a GPU feature), 'bf16' on a GPU without bf16.
    """
    tm.check_choice("--mixed_precision", requested, MIXED_PRECISIONS)
    if cpu:
        if requested == "fp16":
            raise TrainingError(
                "--mixed_precision='fp16' needs a CUDA GPU (float16 training with loss scaling); this run is on "
                "the CPU: use --mixed_precision bf16, no or auto."
            )
        if requested != "auto":
            return requested
        # torch.cpu's capability probes are private: a torch without them counts as "no native bf16"
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return "bf16" if any(probe() for probe in probes if probe is not None) else "no"
    bf16 = torch.cuda.is_bf16_supported()
    if requested == "bf16" and not bf16:
        raise TrainingError(
            f"--mixed_precision='bf16' needs a GPU with bfloat16; {torch.cuda.get_device_name()} has none: use "
            "--mixed_precision fp16, no or auto."
        )
    if requested != "auto":
        return requested
    return "bf16" if bf16 else "no"


class Float32AttnProcessor(AttnProcessor2_0):
    """diffusers' attention with autocast off and float32 inputs: used on CPU under mixed precision.

    PyTorch's CPU flash-attention backward is about 3x slower in bf16 than in float32 at the UNet's mid-block size
    (64 tokens, 8 heads), which cancels most of what bf16 convolutions gain; the attention is a few percent of the
    FLOPs, so it stays in float32 (also the more accurate choice).
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        with torch.autocast(hidden_states.device.type, enabled=False):
            return super().__call__(
                attn, hidden_states.float(), encoder_hidden_states, attention_mask, temb, *args, **kw
            )


def use_float32_attention(model: torch.nn.Module) -> int:
    """Give every attention layer of `model` the `Float32AttnProcessor`; returns how many there are."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.set_processor(Float32AttnProcessor())
    return len(layers)

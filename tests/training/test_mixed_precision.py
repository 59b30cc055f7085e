"""`--mixed_precision auto` (the default) and float32 attention under CPU autocast."""

import json
import os

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import AttnProcessor2_0

from training import train_unconditional as tu
from training import training_run
from training.precision import Float32AttnProcessor, use_float32_attention

from .conftest import TINY_UNET, tiny_args


@pytest.mark.parametrize(
    "avx512_bf16, amx, expected", [(True, False, "bf16"), (False, True, "bf16"), (False, False, "no")]
)
def test_auto_is_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert tu.resolve_mixed_precision("auto", cpu=True) == expected
    for explicit in ("no", "bf16"):  # an explicit choice the CPU can honour is never second-guessed
        assert tu.resolve_mixed_precision(explicit, cpu=True) == explicit
    assert tu.parse_args([]).mixed_precision == "auto"


def test_float32_attention_under_bf16_autocast_equals_float32_attention(monkeypatch):
    torch.manual_seed(0)
    unet = UNet2DModel(**{k: v for k, v in TINY_UNET.items() if not k.startswith("_")})
    attn = unet.mid_block.attentions[0]
    x = torch.randn(2, 16, 2, 2)
    sdpa, dtypes = torch.nn.functional.scaled_dot_product_attention, []
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        lambda q, *a, **k: dtypes.append(q.dtype) or sdpa(q, *a, **k),
    )
    with torch.no_grad():
        reference = attn(x)  # float32, no autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            attn(x)
        assert use_float32_attention(unet) == 1
        assert isinstance(attn.processor, Float32AttnProcessor)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            kept = attn(x)
    # diffusers' processor under autocast attends in bf16; ours in float32, exactly as without autocast
    assert dtypes == [torch.float32, torch.bfloat16, torch.float32]
    assert kept.dtype == torch.float32 and torch.equal(kept, reference)


@pytest.mark.parametrize("precision, resolved, processors_set", [("auto", "bf16", [1]), ("no", "no", [])])
def test_a_run_records_its_precision_and_attends_in_float32_only_under_autocast(
    tmp_path, tiny_config, monkeypatch, precision, resolved, processors_set
):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    calls, real = [], use_float32_attention
    monkeypatch.setattr(training_run, "use_float32_attention", lambda model: calls.append(real(model)) or calls[-1])
    out = tmp_path / precision
    tu.main(tiny_args(tiny_config, out, "--max_train_steps", 2, "--mixed_precision", precision))
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["mixed_precision"] == resolved
    with open(os.path.join(out, "README.md")) as f:
        assert f"Mixed precision on the training machine: `{resolved}`." in f.read()
    assert calls == processors_set  # the tiny UNet has one attention layer (mid block)
    # The exported pipeline is built from the config: it carries diffusers' own attention processor.
    from custom_pipelines import TutorialUnconditionalPipeline

    pipe = TutorialUnconditionalPipeline.from_pretrained(out)
    assert type(pipe.unet.mid_block.attentions[0].processor) is AttnProcessor2_0

"""diffusers' command lines run unchanged (issue 21, item 4): its two flags with nothing to switch on here are accepted
and the log says what happens instead; `--train_scheduler` is deprecated, ignored, and no longer blocks a resume."""

import json
import logging
import os

import numpy as np
import pytest
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from PIL import Image

from training import settings as run_settings
from training import train_unconditional as tu
from training.data.decode import image_to_array
from training.model import build_model

from .conftest import read_losses, tiny_args

DIFFUSERS_FLAGS = ["--enable_xformers_memory_efficient_attention", "--preserve_input_precision"]


def test_a_diffusers_command_line_with_both_flags_runs_and_the_log_says_what_each_does(tmp_path, tiny_config, caplog):
    with caplog.at_level(logging.WARNING, logger="train_unconditional"):
        result = tu.main(tiny_args(tiny_config, tmp_path / "run", "--max_train_steps", 1, *DIFFUSERS_FLAGS))
    assert result["global_step"] == 1
    for note in (run_settings.XFORMERS_NOTE, run_settings.PRESERVE_PRECISION_NOTE):
        assert caplog.messages.count(note) == 1
    assert run_settings.TRAIN_SCHEDULER_NOTE not in caplog.messages  # not given, not mentioned


def test_what_the_two_notes_claim(tmp_path):
    """The xformers note: the UNet's attention is already PyTorch's SDPA (diffusers' AttnProcessor2_0). The precision
    note: a 16-bit image keeps its low 8 bits in `image_to_array`, the one decode of every path (257 and 256 stay
    apart; an 8-bit conversion makes them one value)."""
    settings = tu.resolve_settings(tu.parse_args(["--enable_xformers_memory_efficient_attention"]))
    attention = [m for m in build_model(settings, settings.num_channels).modules() if isinstance(m, Attention)]
    assert attention and all(isinstance(m.processor, AttnProcessor2_0) for m in attention)

    pixels = np.array([[256, 257], [65535, 0]], dtype=np.uint16)
    array = image_to_array(Image.fromarray(pixels), resolution=2, channels=3, center_crop=True)
    assert array.dtype == np.float32 and array.shape == (3, 2, 2)
    np.testing.assert_allclose(array[0], pixels / 65535, rtol=0, atol=1e-7)
    assert array[0, 0, 0] != array[0, 0, 1]


def test_preserve_input_precision_refuses_the_8_bit_cache_naming_both_flags(capsys):
    with pytest.raises(SystemExit):
        tu.parse_args(["--preserve_input_precision", "--data_loading", "cache"])
    assert "--preserve_input_precision with --data_loading='cache'" in capsys.readouterr().err


def test_train_scheduler_warns_is_ignored_and_a_resume_may_change_it(tmp_path, tiny_config, caplog):
    common = ["--checkpointing_steps", 2]
    plain = tmp_path / "plain"
    tu.main(tiny_args(tiny_config, plain, "--max_train_steps", 4, *common))
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="train_unconditional"):
        tu.main(tiny_args(tiny_config, out, "--max_train_steps", 2, "--train_scheduler", "ddim", *common))
    assert caplog.messages.count(run_settings.TRAIN_SCHEDULER_NOTE) == 1

    # A checkpoint written before the flag was retired recorded it as run-defining: it must still resume.
    state_path = os.path.join(out, "checkpoint-2", "training_state.json")
    with open(state_path) as f:
        state = json.load(f)
    assert "train_scheduler" not in state["flags"]  # ignored, so not recorded
    state["flags"]["train_scheduler"] = "ddim"
    with open(state_path, "w") as f:
        json.dump(state, f)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="train_unconditional"):
        resume = ["--max_train_steps", 4, "--resume_from_checkpoint", "latest", "--train_scheduler", "ddpm"]
        result = tu.main(tiny_args(tiny_config, out, *resume, *common))
    assert result["global_step"] == 4
    assert caplog.messages.count(run_settings.TRAIN_SCHEDULER_NOTE) == 1
    assert not any("--train_scheduler:" in m for m in caplog.messages)  # neither refused nor "changed (applied)"
    assert read_losses(out) == read_losses(plain)  # ignored: the same losses as a run without the flag

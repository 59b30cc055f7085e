"""Fixtures of the pipeline tests: tiny random models (a UNet2DModel, an AutoencoderKL) and running code in a fresh
Python process.

pytest runs in importlib mode (setup.cfg), so helpers reach test modules as fixtures, not imports.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel

from schedulers import (
    TutorialDDIMScheduler,
    TutorialDDPMScheduler,
    TutorialDPMSolverPlusPlusScheduler,
    TutorialPFODEScheduler,
    TutorialScoreSDEScheduler,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Prepended to fresh-process scripts that must run with only diffusers importable: our packages are installed in
# editable mode, so a meta-path finder refuses them (and the repository is dropped from sys.path).
BLOCK_OUR_PACKAGES = textwrap.dedent(
    """
    import importlib.abc, sys
    _BLOCKED = {"schedulers", "custom_pipelines", "training"}
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in _BLOCKED:
                raise ImportError(f"{name} is blocked: this process simulates an environment with only diffusers")
            return None
    sys.meta_path.insert(0, _Block())
    sys.path = [p for p in sys.path if p not in ("", ".", REPO_ROOT)]
    """
).replace("REPO_ROOT", repr(REPO_ROOT))


class FreshPython:
    """A script running in a new interpreter (cwd outside the repo, private HF_MODULES_CACHE, offline).

    The script reports by printing one JSON line prefixed with `RESULT:`; `result()` waits and returns that object.
    Start several before collecting their results to run them side by side.
    """

    def __init__(self, script: str, tmp_path, block_our_packages: bool = False, extra_env=None, timeout: int = 180):
        code = (BLOCK_OUR_PACKAGES if block_our_packages else "") + textwrap.dedent(script)
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        env.update(
            HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
            HF_HUB_OFFLINE="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            DIFFUSERS_VERBOSITY="error",
            PYTHONWARNINGS="ignore",
            TQDM_DISABLE="1",
        )
        env.update(extra_env or {})
        workdir = tmp_path / "cwd"
        workdir.mkdir(exist_ok=True)
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def result(self) -> dict:
        try:
            stdout, stderr = self.proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            stdout, stderr = self.proc.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT:")]
        if self.proc.returncode != 0 or not lines:
            raise AssertionError(
                f"fresh process failed (rc={self.proc.returncode}):\n{stdout[-3000:]}\n{stderr[-5000:]}"
            )
        return json.loads(lines[-1][len("RESULT:") :])


def run_fresh_python(script: str, tmp_path, block_our_packages: bool = False, extra_env=None) -> dict:
    """Run `script` in a fresh interpreter and return what it reported (see `FreshPython`)."""
    return FreshPython(script, tmp_path, block_our_packages, extra_env).result()


@pytest.fixture(
    params=[
        TutorialDDPMScheduler,
        TutorialDDIMScheduler,
        TutorialDPMSolverPlusPlusScheduler,
        TutorialPFODEScheduler,
        TutorialScoreSDEScheduler,
    ],
    ids=lambda c: c.__name__,
)
def our_scheduler_cls(request):
    """Each scheduler class of ours in turn."""
    return request.param


@pytest.fixture
def tiny_unet(unet_factory) -> UNet2DModel:
    return unet_factory()


def make_vae(scaling_factor: float = 0.5, shift_factor=None, latent_channels: int = 2, seed: int = 0) -> AutoencoderKL:
    """A tiny random AutoencoderKL: 1-channel 8x8 images <-> `latent_channels` x 4x4 latents (two blocks: f = 2).

    Its UNet: `unet_factory(sample_size=4, in_channels=latent_channels)`.
    """
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=8,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    ).eval()


@pytest.fixture(scope="session")
def vae_factory():
    """`make_vae(scaling_factor=0.5, shift_factor=None, latent_channels=2, seed=0)`: a latent pipeline's autoencoder."""
    return make_vae


@pytest.fixture(scope="session")
def fresh_python():
    """`run(script, tmp_path, block_our_packages=False, extra_env=None) -> dict` (see `run_fresh_python`)."""
    return run_fresh_python


@pytest.fixture(scope="session")
def start_fresh_python():
    """`start(script, tmp_path, block_our_packages=False, extra_env=None) -> FreshPython`; `.result()` waits."""
    return FreshPython

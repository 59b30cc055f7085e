"""Fixtures of the pipeline tests: tiny random models (a UNet2DModel; the AutoencoderKL, `vae_factory`, is in
tests/conftest.py) and running code in a fresh Python process.

pytest runs in importlib mode (setup.cfg), so helpers reach test modules as fixtures, not imports.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from diffusers import UNet2DModel

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


@pytest.fixture(scope="session")
def fresh_python():
    """`run(script, tmp_path, block_our_packages=False, extra_env=None) -> dict` (see `run_fresh_python`)."""
    return run_fresh_python


@pytest.fixture(scope="session")
def start_fresh_python():
    """`start(script, tmp_path, block_our_packages=False, extra_env=None) -> FreshPython`; `.result()` waits."""
    return FreshPython

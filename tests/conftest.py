"""Fixtures shared by every layer's tests."""

import os

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel

# No test may touch the network: the Hub is simulated where a test needs it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny models and evaluations spend more on intra-op contention than they gain
    on a shared CPU (and one thread keeps results bitwise reproducible)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_unet(sample_size: int = 8, in_channels: int = 3, seed: int = 0, **overrides) -> UNet2DModel:
    """A ~20k-parameter UNet2DModel with random weights (deterministic for a seed)."""
    torch.manual_seed(seed)
    config = dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    config.update(overrides)
    return UNet2DModel(**config).eval()


@pytest.fixture(scope="session")
def unet_factory():
    """`make_unet(sample_size=8, in_channels=3, seed=0, **config_overrides)`."""
    return make_unet


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

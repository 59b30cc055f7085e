"""The UNet to train: the small default for the resolution, or a user's config, checked against the data."""

from typing import Dict, Optional

from diffusers import UNet2DModel

from training.errors import TrainingError
from training.super_resolution import is_super_resolution, unet_overrides


def default_unet_config(resolution: int, channels: int, num_class_embeds: Optional[int]) -> Dict:
    """The small default UNet: two resolution levels (three from 32x32 up), ~0.65M parameters at 16x16."""
    levels = 2 if resolution < 32 else 3
    widths = (32, 64, 64)[:levels]
    return dict(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=widths,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        norm_num_groups=8,
        num_class_embeds=num_class_embeds,
    )


def load_unet_config(model_config_name_or_path: str) -> Dict:
    """The `UNet2DModel` config of `--model_config_name_or_path` (a folder or a config.json), read once."""
    try:
        return dict(UNet2DModel.load_config(model_config_name_or_path))
    except (OSError, ValueError) as err:
        raise TrainingError(f"--model_config_name_or_path={model_config_name_or_path!r}: {err}") from err


def build_model(settings, channels: int) -> UNet2DModel:
    """The UNet to train (the small default, or the config of `--model_config_name_or_path`), checked against the data.

    Args:
        settings (`Settings`): the resolved settings; `settings.unet_config` is the user's config (read once by
            `resolve_settings`) or None for the small default.
        channels (`int`): the data's channel count.
    """
    # One extra class index, `num_class_embeds`, is the "no label" class of classifier-free guidance.
    num_embeds = settings.num_class_embeds + 1 if settings.num_class_embeds else None
    # SR3 (`--conditioning super_resolution`): 2C input channels (x_t, then A⁺ y), the noise level as class label.
    sr = unet_overrides(channels) if is_super_resolution(settings) else {}
    config = settings.unet_config
    if config is None:
        model = UNet2DModel(**{**default_unet_config(settings.resolution, channels, num_embeds), **sr})
    else:
        model = UNet2DModel.from_config(config)
        if sr and model.config.in_channels in (channels, 2 * channels):
            model = UNet2DModel.from_config(config, **sr)  # a config for the images alone, or already SR3's
        in_channels = sr.get("in_channels", channels)
        if model.config.in_channels != in_channels or model.config.sample_size != settings.resolution:
            raise TrainingError(
                f"--model_config_name_or_path={settings.model_config_name_or_path!r} has in_channels="
                f"{model.config.in_channels}, sample_size={model.config.sample_size}; the data has {channels} "
                f"channel(s) at --resolution={settings.resolution}"
                + (f" (SR3 takes {channels} or {in_channels} in_channels)." if sr else ".")
            )
        if num_embeds is not None and model.config.num_class_embeds != num_embeds:
            model = UNet2DModel.from_config(config, num_class_embeds=num_embeds)
    check_resolution(model, settings.resolution)
    return model


def check_resolution(model: UNet2DModel, resolution: int) -> None:
    """The UNet halves the image after every down block but the last: `--resolution` must divide by 2^(blocks-1)."""
    halvings = len(model.config.down_block_types) - 1
    factor = 2**halvings
    if resolution % factor:
        lower, upper = resolution // factor * factor, (resolution // factor + 1) * factor
        choices = f"{lower} or {upper}" if lower > 0 else f"{upper} or another multiple of {factor}"
        raise TrainingError(
            f"--resolution={resolution} is not supported by this UNet: it halves the image {halvings} time(s), so "
            f"the resolution must be a multiple of {factor}; use e.g. --resolution {choices}."
        )

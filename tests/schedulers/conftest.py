"""What the scheduler contract tests share (test_contract.py for all five, test_discrete_contract.py for DDPM/DDIM)."""

# Keys every one of our schedulers shares with diffusers' DDPM/DDIM, with values other than the defaults.
SHARED_CONFIG = dict(
    num_train_timesteps=500,
    beta_start=0.0002,
    beta_end=0.03,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    thresholding=True,
    dynamic_thresholding_ratio=0.9,
    sample_max_value=3.0,
    timestep_spacing="trailing",
    steps_offset=0,
)

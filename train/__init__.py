"""Config, data pipeline, training loop, evaluation, logging, checkpoints and sweeps."""

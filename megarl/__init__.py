"""megarl: RL with verifiable rewards for Mixture-of-Experts models on Megatron-core."""

__version__ = "0.1.0"

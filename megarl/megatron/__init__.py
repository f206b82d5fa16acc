"""Everything that imports megatron-core: process groups (`parallel`), GPTModel from an HF
config (`model`), vocab-parallel log-probs (`logprobs`), sequence packing (`packing`), the
policy loss as a megatron loss function and its normalisation contract (`loss`), the train
step and forward-only log-probs (`step`), and the optimizer (`optimizer`).

Submodules are imported explicitly (``from megarl.megatron.step import train_step``) so that
``import megarl`` never pays for megatron-core.
"""

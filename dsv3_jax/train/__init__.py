"""Config-driven training: `trainer.train(config)`, the grain data pipeline, orbax checkpoints.

Import the submodules directly (`from dsv3_jax.train import trainer`); `dsv3_jax.train.cli`
must stay importable without jax.
"""

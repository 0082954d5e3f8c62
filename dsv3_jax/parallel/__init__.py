"""The emulated node x GPU mesh and the expert-parallel dispatch schedules.

`mesh` does not import jax at module level (entry points set the device count first);
import `dsv3_jax.parallel.dispatch` for the schedules.
"""

"""The package layout (the metadata is in pyproject.toml).

The trainer's files live in train/, so that `python -m train.distill` runs from a checkout, and install as
`sparge_jax.train`: nothing named train, benchmarks or experiments lands in site-packages. Inside train/ the
imports are relative, so the same files work under both names.
"""

from setuptools import find_packages, setup

setup(
  packages=find_packages(include=["sparge_jax", "sparge_jax.*", "pallas_kernels", "pallas_kernels.*"])
  + [f"sparge_jax.{name}" for name in find_packages(include=["train", "train.*"])],
  package_dir={"sparge_jax.train": "train"},
)

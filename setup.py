"""Package layout that pyproject.toml cannot express alone: the converter lives in the top-level
convert/ folder and installs as the subpackage mlxllama.convert."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["mlxllama", "mlxllama.*"]) + ["mlxllama.convert"],
    package_dir={"mlxllama.convert": "convert"},
)

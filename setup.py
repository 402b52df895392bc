"""tfx: Transfusion pretraining in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="tfx",
    version="0.1.0",
    description="Transfusion (next-token + diffusion) pretraining in JAX/Flax",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["tfx", "tfx.*"]),
    package_data={"tfx": ["data/assets/*"]},
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.9",
        "array-record>=0.8",
        "pyarrow",  # zstd for tfx/data/array_records.py (tensorflow-datasets requires it already)
        "sentencepiece>=0.2",
        "ml-collections>=1.0",
        "absl-py",
        "fsspec",  # workdir files on any filesystem (tfx/fs.py)
        "numpy",
        "matplotlib",  # tfx.sweep's plots (Agg backend)
        "pillow",
        "safetensors",
        "tensorboardX",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5"],  # pytest.ini runs 2 workers
        "gcs": ["gcsfs"],  # gs:// workdirs and data (fsspec, and etils.epath, which Orbax and tfds use)
    },
)

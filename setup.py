"""distill_sbs: distill LLM teachers into T5 students (Distilling Step-by-Step and relatives)."""

from setuptools import find_packages, setup

setup(
    name="distill_sbs",
    version="0.1.0",
    description="Distilling Step-by-Step, Fine-tune-CoT and TinyLLM for T5 students in JAX/Flax",
    python_requires=">=3.11",
    # `tasks/` is shipped as the namespaced package `distill_sbs.tasks`, not as a bare `tasks`.
    packages=find_packages(include=["distill_sbs", "distill_sbs.*"]) + ["distill_sbs.tasks"],
    package_dir={"distill_sbs.tasks": "tasks"},
    package_data={
        "distill_sbs": [
            "data/assets/*",
            "data/assets/*/*",
            "gin/*.gin",
            "gin/*/*.gin",
            "gin/*/*/*.gin",
        ]
    },
    include_package_data=True,
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "seqio>=0.0.19",
        "tensorflow>=2.16",
        "tensorflow-text>=2.16",
        "tensorflow-datasets>=4.9",
        "gin-config>=0.5",
        "sentencepiece>=0.2",
        "absl-py",
        "clu>=0.0.12",
        "etils[epath]",
        "requests>=2.31",
        "numpy",
        "safetensors>=0.4",
        "tensorboard>=2.16",
        # distill_sbs.serve: ASGI app, HTTP/1.1 server, /metrics
        "starlette>=0.40",
        "uvicorn>=0.30",
        "prometheus-client>=0.20",
        "matplotlib>=3.8",  # distill_sbs.sweep: the reproduction plots (Agg backend, PNG files)
        "scipy>=1.10",  # distill_sbs.sweep: Student-t intervals (jax requires scipy already)
    ],
    extras_require={
        # Accelerators: `pip install -e '.[cuda]'` (NVIDIA GPUs, CUDA 12 wheels) or '.[tpu]'
        # (Cloud TPU VMs); plain `pip install -e .` gives CPU jax.
        "cuda": ["jax[cuda12]>=0.6"],
        "tpu": ["jax[tpu]>=0.6"],
        "test": [
            "pytest>=8",
            "ruff>=0.6",
            "transformers>=4.44",
            "torch==2.13.0",
            "openai>=1.40",  # tests/test_serve_openai.py: the official client against serve
            # tests/test_gcs.py: a GCS emulator on loopback, reached by epath through gcsfs
            "gcp-storage-emulator>=2024.8",
            "gcsfs>=2024.6",
            # tests/test_t5x_*: upstream T5X (../shared/upstream, the oracle) imports these
            "grain>=0.2",
            "cached_property",
            "fiddle>=0.3",
            "jaxtyping>=0.2",
        ],
    },
)

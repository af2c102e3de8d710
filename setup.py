"""trex_fast: a high-throughput trainer for the t-ReX / t-ReX* supervised recipe.

Credit: Sariyildiz, Kalantidis, Alahari, Larlus, "No Reason for No Supervision: Improved
Generalization in Supervised Models", ICLR 2023 (arXiv 2206.15369).
"""
from setuptools import find_packages, setup

# The versions the code supports, so that installing trex_fast keeps a user's torch; the exact
# versions CI is tested with are installed by tools/setup_env.sh. The lower bounds are the GPU
# acceptance image's (torch 2.11, torchvision 0.26).
TORCH = ["torch>=2.11,<2.15", "torchvision>=0.26,<0.30"]

EXTRAS = {
    # ffcv compiles against the system's OpenCV and libjpeg-turbo (tools/setup_env.sh).
    "ffcv": ["ffcv==1.0.2", "opencv-python-headless"],
    # DALI wheels are built per CUDA major version and need a driver that supports it; CPU
    # pipelines (device_id=None) run with either: `dali` for CUDA 13 drivers, `dali-cuda12`
    # for CUDA 12 drivers.
    "dali": ["nvidia-dali-cuda130"],
    "dali-cuda12": ["nvidia-dali-cuda120"],
    # scikit-learn: the probes are tested against it; pytest-xdist: the suite on both cores (-n 2)
    "dev": ["pytest", "pytest-xdist", "ruff", "scikit-learn"],
    # the transfer suite: optuna (the probes' TPE search), scikit-learn (the L-BFGS probe is its
    # LogisticRegression), scipy (Flowers102, StanfordCars .mat)
    "eval": ["optuna", "scikit-learn", "scipy"],
    # `python -m trex_fast.sweep`: submitit for --launcher=slurm, pyyaml for YAML sweep files
    "sweep": ["submitit", "pyyaml"],
    "tensorboard": ["tensorboard"],  # `--tensorboard` event files per run
    # `--arch=timm/<name>` backbones (ViTs, ConvNeXt; trex_fast.models.registry) and the
    # shareable weights of `python -m trex_fast.eval export` (model.safetensors)
    "models": ["timm>=1.0.31,<2", "safetensors>=0.4"],  # the versions tested,
}
# everything with one DALI (CUDA 13); a CUDA 12 machine: '.[ffcv,dali-cuda12,dev]'
EXTRAS["all"] = sorted({req for name, reqs in EXTRAS.items() if name != "dali-cuda12"
                        for req in reqs})

setup(
    name="trex_fast",
    version="0.1.0",
    description="High-throughput trainer for t-ReX / t-ReX* (ICLR 2023) on ImageNet-1K",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["trex_fast", "trex_fast.*", "pipelines", "pipelines.*"]),
    install_requires=TORCH + ["fire", "numba", "numpy", "pillow", "tqdm", "matplotlib"],
    extras_require=EXTRAS,
)

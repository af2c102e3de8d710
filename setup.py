"""trex_fast: a high-throughput trainer for the t-ReX / t-ReX* supervised recipe.

Credit: Sariyildiz, Kalantidis, Alahari, Larlus, "No Reason for No Supervision: Improved
Generalization in Supervised Models", ICLR 2023 (arXiv 2206.15369).
"""
from setuptools import find_packages, setup

# torch is pinned: these wheels are the ones the project is tested with (CUDA 13 build).
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]

EXTRAS = {
    # ffcv compiles against the system's OpenCV and libjpeg-turbo (tools/setup_env.sh).
    "ffcv": ["ffcv==1.0.2", "opencv-python-headless"],
    # The CUDA 13 build matches torch 2.14's CUDA; CPU pipelines use device_id=None.
    "dali": ["nvidia-dali-cuda130"],
    "dev": ["pytest", "ruff", "scikit-learn"],  # scikit-learn: the probes are tested against it
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})

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

from setuptools import find_packages, setup

setup(
    name="gmmseg_d2",
    version="0.1.0",
    description="GMMSeg (generative semantic segmentation) as a Detectron2 project",
    packages=find_packages(include=["gmmseg_d2", "gmmseg_d2.*"]),
    python_requires=">=3.10",
    install_requires=[],  # installed by tools/setup_env.sh; see requirements.txt
)

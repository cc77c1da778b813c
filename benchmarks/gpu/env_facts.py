"""Print one JSON line of facts about this machine's torch, accelerator and installed packages (the check's step 1)."""

import importlib.metadata as metadata
import json
import os
import platform

import torch

PACKAGES = ("torch", "torchvision", "diffusers", "accelerate", "transformers", "datasets", "safetensors",
            "huggingface_hub", "torchmetrics", "numpy")


def facts() -> dict:
    """Get the versions, CPU count and (when present) the CUDA device's name, memory and bf16 support."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    found = {"python": platform.python_version(), "cpus": os.cpu_count(), "versions": versions,
             "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        found.update(gpu=properties.name, gpu_count=torch.cuda.device_count(),
                     gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                     capability=f"{properties.major}.{properties.minor}", bf16=torch.cuda.is_bf16_supported())
    return found


if __name__ == "__main__":
    print(json.dumps(facts()))

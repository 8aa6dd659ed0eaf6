"""The machine line every benchmark prints above its figures (timings compare only on one machine)."""

import os
import platform

import torch


def describe_machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {gpu}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads"
    )

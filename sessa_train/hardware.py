"""The accelerators the framework plans and reports for, in one table.

Dense (no sparsity) tensor-core peaks, HBM and L2 bandwidth, memory as torch reports it, SMs and
compute capability. The trainer's MFU takes the running device's peak from here by its name
(``logging.peak_tflops`` overrides it), as do ``sessa-plan`` and ``tools/kernel_model.py``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    bf16: float  # FLOP/s, dense bf16 / fp16 tensor cores
    tf32: float  # FLOP/s, dense tf32 tensor cores
    hbm: float  # bytes/s
    l2: float  # bytes/s
    memory: float  # bytes usable by torch
    sms: int
    cc: int  # compute capability, e.g. 90

    def peak(self, precision: str) -> float:
        """Peak FLOP/s for a run in ``precision`` ("bf16" or "fp32": fp32 matmuls as tf32)."""
        return self.bf16 if precision == "bf16" else self.tf32


GiB = 2**30
GPUS = {
    "A100": GPU("A100", 312e12, 156e12, 2.0e12, 5.0e12, 79.2 * GiB, 108, 80),
    "H100": GPU("H100", 989e12, 495e12, 3.35e12, 10e12, 79.1 * GiB, 132, 90),
    "H200": GPU("H200", 989e12, 495e12, 4.8e12, 10e12, 139.8 * GiB, 132, 90),
}


def gpu_named(device_name: str) -> GPU | None:
    """The entry whose name is in a device name such as "NVIDIA H100 80GB HBM3", else None."""
    return next((gpu for name, gpu in GPUS.items() if name in device_name.upper()), None)


def peak_tflops(device_name: str, precision: str) -> float:
    """Peak TFLOP/s of the named device for ``precision``; 0.0 when it is not in the table (a CPU)."""
    gpu = gpu_named(device_name)
    return gpu.peak(precision) / 1e12 if gpu else 0.0

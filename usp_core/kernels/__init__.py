"""The expert pool of SPEC §3.1/§3.4: the four forecasting kernels A, B, C, D, then the anchor experts, in weight
order (A ridge, B dgm, C sde, D signature, last_value, long_mean)."""

from usp_core.kernels import anchors, dgm, ridge, sde, signature
from usp_core.kernels.contract import ForecastKernel, KernelResult

KERNELS: tuple[ForecastKernel, ...] = (ridge.KERNEL, dgm.KERNEL, sde.KERNEL, signature.KERNEL)
ANCHORS: tuple[ForecastKernel, ...] = (anchors.LAST_VALUE, anchors.LONG_MEAN)
EXPERTS: tuple[ForecastKernel, ...] = KERNELS + ANCHORS
KERNEL_NAMES: tuple[str, ...] = tuple(k.name for k in KERNELS)
EXPERT_NAMES: tuple[str, ...] = tuple(k.name for k in EXPERTS)
SIGNATURE_INDEX = KERNEL_NAMES.index("signature")
"""Kernel D: the expert emergency mode forces (SPEC §3.8)."""

__all__ = ["ANCHORS", "EXPERTS", "EXPERT_NAMES", "KERNELS", "KERNEL_NAMES", "SIGNATURE_INDEX", "ForecastKernel",
           "KernelResult"]

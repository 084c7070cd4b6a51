"""The four forecasting kernels of SPEC §3.4, in weight order A, B, C, D."""

from usp_core.kernels import dgm, ridge, sde, signature
from usp_core.kernels.contract import ForecastKernel, KernelResult

KERNELS: tuple[ForecastKernel, ...] = (ridge.KERNEL, dgm.KERNEL, sde.KERNEL, signature.KERNEL)
KERNEL_NAMES: tuple[str, ...] = tuple(k.name for k in KERNELS)

__all__ = ["KERNELS", "KERNEL_NAMES", "ForecastKernel", "KernelResult"]

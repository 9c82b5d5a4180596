"""Measured kernel latencies: kernels per device, timing, hardware profiles, the latency model."""

from .kernels import Kernel, kernels_for, register_kernel
from .measure import measure_profile
from .predict import LatencyModel
from .profile import HardwareProfile
from .runtime import attach_kernels, time_forward

__all__ = ["Kernel", "kernels_for", "register_kernel", "measure_profile", "LatencyModel", "HardwareProfile",
           "attach_kernels", "time_forward"]

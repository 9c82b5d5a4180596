"""Measured kernel latencies: kernels per device, timing, hardware profiles, the latency model.

Exports load on first use (PEP 562): planning against a hardware profile needs only numpy and
pydantic, while kernels, measurement and runtime import torch."""

from ..lazy import lazy_exports

_WHERE = {"Kernel": ".kernels", "kernels_for": ".kernels", "register_kernel": ".kernels", "measure_profile": ".measure",
          "LatencyModel": ".predict", "HardwareProfile": ".profile", "attach_kernels": ".runtime",
          "time_forward": ".runtime"}
__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)

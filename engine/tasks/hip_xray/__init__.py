"""Paediatric hip X-ray task (docs/systems/hip_xray_efficientnet.md): AI / IHDI geometry, the accumulator, its
figures."""
from .metrics import HipXrayAccumulator
from .task import HipXrayTask, confusion_from_records

__all__ = ["HipXrayAccumulator", "HipXrayTask", "confusion_from_records"]

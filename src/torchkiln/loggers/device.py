"""Per-epoch accelerator numbers on CUDA: peak allocated/reserved memory, and GPU utilization via
nvidia-ml-py (`pynvml`) when it is installed. On any other device every call does nothing."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("torchkiln")
MB = 2**20


class DeviceStats:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self._nvml = None  # a pynvml device handle once looked up; False when unavailable
        self._util: list[float] = []

    def epoch_start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self._util = []

    def sample(self) -> None:
        """Called at each logging flush (once per logging.every_n_steps): GPU utilization now."""
        if not self.cuda:
            return
        handle = self._handle()
        if handle:
            import pynvml

            try:
                self._util.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))
            except pynvml.NVMLError:
                self._nvml = False

    def epoch_end(self) -> dict[str, float]:
        if not self.cuda:
            return {}
        out = {
            "memory/peak_allocated_mb": torch.cuda.max_memory_allocated(self.device) / MB,
            "memory/peak_reserved_mb": torch.cuda.max_memory_reserved(self.device) / MB,
        }
        if self._util:
            out["gpu/utilization_pct"] = sum(self._util) / len(self._util)
        return out

    def _handle(self):
        if self._nvml is None:
            self._nvml = False
            try:
                import pynvml

                pynvml.nvmlInit()
                index = self.device.index if self.device.index is not None else torch.cuda.current_device()
                # NVML counts physical GPUs; torch maps CUDA_VISIBLE_DEVICES (private helper, guarded).
                to_nvml = getattr(torch.cuda, "_get_nvml_device_index", None)
                index = to_nvml(index) if to_nvml is not None else index
                self._nvml = pynvml.nvmlDeviceGetHandleByIndex(index)
            except ImportError:
                pass  # nvidia-ml-py not installed: no utilization, memory still reported
            except Exception as exc:  # noqa: BLE001 - NVML missing or refusing: go without it
                log.debug("GPU utilization unavailable: %s", exc)
        return self._nvml

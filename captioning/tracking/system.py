"""System metrics for a tracked run: CPU, memory, process RSS, disk, network and GPU, sampled in a thread.

    sampler = SystemSampler(tracker, interval_s=10.0)   # logs ``system/<name>`` metrics every 10 s
    sampler.stop()

``MlflowTracker`` starts one when made with ``system_metrics=True``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from typing import Any

from captioning.tracking import Tracker

logger = logging.getLogger(__name__)


class SystemSampler:
    """Every ``interval_s``: CPU, memory, process RSS, disk, network and GPU as ``system/<name>`` metrics.

    Names follow MLflow's own system metrics (``system/cpu_utilization_percentage``, ...), but samples go
    through the tracker's queue, so an outage loses none of them. GPU figures come from pynvml when it
    is installed, else from torch (only when the process already imported it).
    """

    def __init__(self, tracker: Tracker, interval_s: float) -> None:
        import psutil

        self._psutil = psutil
        self._tracker = tracker
        self._interval_s = interval_s
        self._process = psutil.Process()
        self._cpu_last = self._cpu_times()
        self._net_start = self._net_counters()
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception:
            self._nvml = None
        self._stop_event = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlflow-system-metrics", daemon=True)
        self._thread.start()

    def _cpu_times(self) -> tuple[float, float]:
        """(busy, total) CPU seconds so far: our own window rather than psutil.cpu_percent's
        process-wide one, so a parent's and a child's sampler do not shorten each other's."""
        times = self._psutil.cpu_times()
        guest = getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)  # counted in user too
        total = sum(times) - guest
        return total - times.idle - getattr(times, "iowait", 0.0), total

    def _cpu_percent(self) -> float:
        busy, total = self._cpu_times()
        busy_before, total_before = self._cpu_last
        self._cpu_last = (busy, total)
        return 100.0 * (busy - busy_before) / (total - total_before) if total > total_before else 0.0

    def _net_counters(self) -> tuple[float, float] | None:
        try:
            counters = self._psutil.net_io_counters()
        except Exception:
            return None
        return (counters.bytes_recv, counters.bytes_sent) if counters is not None else None

    def sample(self) -> dict[str, float]:
        psutil = self._psutil
        memory = psutil.virtual_memory()
        values = {
            "cpu_utilization_percentage": self._cpu_percent(),
            "system_memory_usage_megabytes": memory.used / 1e6,
            "system_memory_usage_percentage": memory.percent,
            "process_rss_megabytes": self._process.memory_info().rss / 1e6,
        }
        with contextlib.suppress(Exception):
            disk = psutil.disk_usage(os.path.abspath(os.sep))
            values |= {
                "disk_usage_percentage": disk.percent,
                "disk_usage_megabytes": disk.used / 1e6,
                "disk_available_megabytes": disk.free / 1e6,
            }
        net = self._net_counters()
        if net is not None and self._net_start is not None:
            values["network_receive_megabytes"] = (net[0] - self._net_start[0]) / 1e6
            values["network_transmit_megabytes"] = (net[1] - self._net_start[1]) / 1e6
        with contextlib.suppress(Exception):
            values |= self._gpu()
        return {f"system/{k}": float(v) for k, v in values.items()}

    def _gpu(self) -> dict[str, float]:
        values: dict[str, float] = {}
        if self._nvml is not None:
            nvml = self._nvml
            for i in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                values[f"gpu_{i}_utilization_percentage"] = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
                values[f"gpu_{i}_memory_usage_megabytes"] = memory.used / 1e6
                values[f"gpu_{i}_memory_usage_percentage"] = 100.0 * memory.used / max(memory.total, 1)
            return values
        torch = sys.modules.get("torch")  # importing torch just to sample would cost seconds
        if torch is None or not torch.cuda.is_available():
            return values
        for i in range(torch.cuda.device_count()):
            values[f"gpu_{i}_memory_allocated_megabytes"] = torch.cuda.memory_allocated(i) / 1e6
            values[f"gpu_{i}_memory_reserved_megabytes"] = torch.cuda.memory_reserved(i) / 1e6
            with contextlib.suppress(Exception):  # needs pynvml or amdsmi underneath
                values[f"gpu_{i}_utilization_percentage"] = float(torch.cuda.utilization(i))
        return values

    def _loop(self) -> None:
        step = 0
        while not self._stop_event.wait(self._interval_s):
            try:
                self._tracker.log_metrics(self.sample(), step=step)
            except Exception as exc:  # a sampler must never take the run down
                logger.debug("system metrics sample failed: %s", exc)
            step += 1

    def stop(self) -> None:
        self._stop_event.set()
        self._thread.join(timeout=5.0)

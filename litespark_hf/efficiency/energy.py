"""Energy measurement: CodeCarbon's offline tracker (one per node) and NVML's GPU energy counter.

Nothing here touches the network: only ``codecarbon.OfflineEmissionsTracker`` is used (the online
``EmissionsTracker`` looks the location up on the internet and silently falls back to Canada offline). Every call
is failure-tolerant: a tracker that cannot start, sample or stop warns once and reports nothing, it never raises
into the training loop.
"""

from __future__ import annotations

import logging
import os
import time
import warnings

__all__ = ["CodeCarbonMeter", "NvmlEnergyCounter", "DEFAULT_COUNTRY"]

# ISO 3166-1 alpha-3; override with the argument or LITESPARK_COUNTRY_ISO_CODE.
DEFAULT_COUNTRY = "USA"
_MEASURED_CPU_MODES = {"intel_rapl", "intel_power_gadget", "windows_emi"}


def _warn(message: str) -> None:
    warnings.warn(f"litespark_hf.efficiency: {message}", RuntimeWarning, stacklevel=3)


class CodeCarbonMeter:
    """A failure-tolerant wrapper around ``codecarbon.OfflineEmissionsTracker`` (machine mode: the whole node).

    ``start()``; ``sample()`` -> cumulative kWh so far (total, gpu, cpu, ram) or None; ``stop()`` -> the final
    figures (dict) or None. ``measured`` says which parts come from hardware counters (GPU: NVML; CPU: RAPL) and
    which are CodeCarbon's models (CPU TDP x load, RAM per GB): ``is_estimate`` is True when no counter was found.
    """

    def __init__(self, output_dir: str, country_iso_code: str | None = None, region: str | None = None,
                 measure_power_secs: float = 5.0, project_name: str = "litespark_hf"):
        self.output_dir = output_dir
        self.country_iso_code = (country_iso_code or os.environ.get("LITESPARK_COUNTRY_ISO_CODE")
                                 or DEFAULT_COUNTRY).upper()
        self.region = region or os.environ.get("LITESPARK_REGION") or None
        self.measure_power_secs = measure_power_secs
        self.project_name = project_name
        self.tracker = None
        self.failed: str | None = None
        self.measured = {"gpu": False, "cpu": False, "ram": False}
        self.hardware: list[str] = []
        self._t0: float | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> bool:
        try:
            from codecarbon import OfflineEmissionsTracker

            os.makedirs(self.output_dir, exist_ok=True)
            logging.getLogger("codecarbon").setLevel(logging.ERROR)
            kwargs = dict(country_iso_code=self.country_iso_code, output_dir=self.output_dir, output_methods=[],
                          log_level="error", measure_power_secs=self.measure_power_secs, tracking_mode="machine",
                          project_name=self.project_name, allow_multiple_runs=True)
            if self.region:
                kwargs["region"] = self.region
            self.tracker = OfflineEmissionsTracker(**kwargs)
            self.tracker.start()
            if getattr(self.tracker, "_start_time", None) is None:  # CodeCarbon swallows its own errors
                raise RuntimeError("CodeCarbon did not start (see the codecarbon log)")
            self._inspect_hardware()
            self._t0 = time.perf_counter()
            return True
        except Exception as exc:  # noqa: BLE001 - never stop training for the energy figures
            self._fail(f"CodeCarbon tracker could not start ({type(exc).__name__}: {exc}); training goes on "
                       "without energy figures")
            return False

    def _inspect_hardware(self) -> None:
        for hw in getattr(self.tracker, "_hardware", []) or []:
            kind = type(hw).__name__
            try:
                self.hardware.append(hw.description() if hasattr(hw, "description") else repr(hw))
            except Exception:  # noqa: BLE001
                self.hardware.append(kind)
            if kind == "GPU":
                self.measured["gpu"] = True  # NVML: energy counter, or sampled power
            elif kind == "CPU" and getattr(hw, "_mode", None) in _MEASURED_CPU_MODES:
                self.measured["cpu"] = True
            elif kind == "AppleSiliconChip":
                self.measured["cpu"] = True

    @property
    def is_estimate(self) -> bool:
        return not (self.measured["gpu"] or self.measured["cpu"])

    @property
    def active(self) -> bool:
        return self.tracker is not None and self.failed is None

    def _fail(self, message: str) -> None:
        if self.failed is None:
            _warn(message)
        self.failed = message

    def sample(self) -> dict | None:
        """Cumulative energy so far, in kWh (``total``, ``gpu``, ``cpu``, ``ram``), measured now."""
        if not self.active:
            return None
        try:
            tr = self.tracker
            measure = getattr(tr, "_measure_power_and_energy_if_stale", None)
            if callable(measure):
                measure()
            return {"total": float(tr._total_energy.kWh), "gpu": float(tr._total_gpu_energy.kWh),
                    "cpu": float(tr._total_cpu_energy.kWh), "ram": float(tr._total_ram_energy.kWh),
                    "time": time.perf_counter()}
        except Exception as exc:  # noqa: BLE001
            # Live sampling uses CodeCarbon internals; the final figures (stop) do not depend on it.
            _warn(f"live energy sampling unavailable ({type(exc).__name__}: {exc})")
            self.sample = lambda: None  # type: ignore[method-assign]
            return None

    def stop(self) -> dict | None:
        """Stop and return the final figures: kWh (total/gpu/cpu/ram), kg CO2eq, duration, location."""
        if not self.active:
            return None
        try:
            tr, self.tracker = self.tracker, None
            emissions = tr.stop()
            data = getattr(tr, "final_emissions_data", None)
            if emissions is None or data is None:
                raise RuntimeError("CodeCarbon returned no emissions data")
            return {
                "energy_kwh": float(data.energy_consumed),
                "gpu_kwh": float(data.gpu_energy),
                "cpu_kwh": float(data.cpu_energy),
                "ram_kwh": float(data.ram_energy),
                "emissions_kg": float(emissions),
                "duration_s": float(data.duration),
                "gpu_power_w": float(data.gpu_power),
                "cpu_power_w": float(data.cpu_power),
                "ram_power_w": float(data.ram_power),
                "country_name": data.country_name,
                "country_iso_code": data.country_iso_code,
                "region": data.region,
                "gpu_model": data.gpu_model,
                "cpu_model": data.cpu_model,
            }
        except Exception as exc:  # noqa: BLE001
            self._fail(f"CodeCarbon tracker failed at stop ({type(exc).__name__}: {exc})")
            return None


class NvmlEnergyCounter:
    """Total-energy counters (millijoules since driver load) of the visible NVIDIA GPUs, through pynvml.

    ``read()`` returns the summed counter in joules, or None where NVML or the counter (Volta and newer) is missing.
    ``devices`` restricts to CUDA device indices (mapped through the PCI bus id); default: all visible devices.
    """

    def __init__(self, devices: list[int] | None = None):
        self.handles = []
        self.error: str | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            import torch

            indices = devices if devices is not None else list(range(torch.cuda.device_count()))
            for i in indices:
                self.handles.append(self._handle(pynvml, torch, i))
            if not self.handles:
                raise RuntimeError("no GPU")
            self.read_mj()  # raises where the counter is unsupported
        except Exception as exc:  # noqa: BLE001
            self.handles = []
            self.error = f"{type(exc).__name__}: {exc}"

    @staticmethod
    def _handle(pynvml, torch, index: int):
        """NVML handle of CUDA device ``index`` (by PCI address, so CUDA_VISIBLE_DEVICES is honoured)."""
        try:
            props = torch.cuda.get_device_properties(index)
            bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
            return pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
        except Exception:  # noqa: BLE001
            return pynvml.nvmlDeviceGetHandleByIndex(index)

    @property
    def available(self) -> bool:
        return bool(self.handles)

    def read_mj(self) -> int:
        return sum(int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in self.handles)

    def read(self) -> float | None:
        if not self.handles:
            return None
        try:
            return self.read_mj() / 1000.0
        except Exception:  # noqa: BLE001
            return None

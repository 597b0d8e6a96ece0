"""The environment a measurement was made in: device identity, clocks, software, commit.

On NVIDIA GPUs the identity and state come from NVML through nvidia-ml-py (name, UUID, driver,
compute capability, SM and memory clocks, temperature, power, throttle reasons). NVML is only
read, never written: no clock, power, persistence or MIG setting is changed. Without
nvidia-ml-py, without NVML or without a GPU, the record says so and everything else is still
collected.

`python -m mvit3.bench.env [--json PATH]` prints (or writes) the record as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

import mvit3

# NVML clock-event ("throttle") reason bits, from nvml.h; stable across driver versions.
THROTTLE_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}


def decode_throttle_reasons(mask: int) -> list:
    """Names of the set bits of an NVML clock-event mask; unknown bits as hex."""
    names = [name for bit, name in THROTTLE_REASONS.items() if mask & bit]
    unknown = mask & ~sum(THROTTLE_REASONS)
    if unknown:
        names.append(hex(unknown))
    return names


def project_root() -> Path:
    """The checkout (or install) directory holding the mvit3 package."""
    return Path(mvit3.__file__).resolve().parent.parent


def scrub_paths(text: str) -> str:
    """Results are committed: name the checkout and the home directory, not this machine's
    paths to them."""
    for path, name in ((str(project_root()), "<checkout>"), (str(Path.home()), "~")):
        text = text.replace(path, name)
    return text


def git_info(root: Optional[Path] = None) -> dict:
    """{'commit', 'dirty', 'source'}; MVIT3_GIT_COMMIT stands in where there is no checkout."""
    root = root or project_root()
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                 "--untracked-files=no"], capture_output=True, text=True,
                                timeout=10, check=True).stdout
        return {"commit": commit, "dirty": bool(status.strip()), "source": "git"}
    except (OSError, subprocess.SubprocessError):
        given = os.environ.get("MVIT3_GIT_COMMIT")
        if given:
            return {"commit": given, "dirty": None, "source": "MVIT3_GIT_COMMIT"}
        return {"commit": None, "dirty": None,
                "source": "unknown: not a git checkout (set MVIT3_GIT_COMMIT to record it)"}


def _text(value) -> Optional[str]:
    """NVML strings are bytes in old nvidia-ml-py releases and str in new ones."""
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


class _Reader:
    """Calls NVML getters one by one; a getter that fails leaves None and a note."""

    def __init__(self, nvml):
        self.nvml = nvml
        self.errors = {}

    def get(self, key: str, names, *args):
        for name in ([names] if isinstance(names, str) else names):
            fn = getattr(self.nvml, name, None)
            if fn is None:
                continue
            try:
                return fn(*args)
            except Exception as err:  # NVMLError_NotSupported and friends: note and go on
                self.errors[key] = f"{type(err).__name__}: {err}"
                return None
        self.errors[key] = f"this nvidia-ml-py has no {names}"
        return None


def _nvml_handle(nvml, torch_index: int):
    """The NVML handle of torch's CUDA device `torch_index` (UUID match, else same index)."""
    uuid = None
    if torch.cuda.is_available():
        uuid = getattr(torch.cuda.get_device_properties(torch_index), "uuid", None)
    if uuid is not None:
        wanted = str(uuid).lower().removeprefix("gpu-")
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            if _text(nvml.nvmlDeviceGetUUID(handle)).lower().removeprefix("gpu-") == wanted:
                return handle, "uuid"
    return nvml.nvmlDeviceGetHandleByIndex(torch_index), "index"


def gpu_state(nvml, handle) -> dict:
    """What changes while benchmarks run: clocks, temperature, power, throttle reasons."""
    r = _Reader(nvml)

    def mhz(key, clock):
        return r.get(key, "nvmlDeviceGetClockInfo", handle, clock)

    power_mw = r.get("power_w", "nvmlDeviceGetPowerUsage", handle)
    limit_mw = r.get("power_limit_w", "nvmlDeviceGetEnforcedPowerLimit", handle)
    mask = r.get("throttle_reasons", ["nvmlDeviceGetCurrentClocksEventReasons",
                                      "nvmlDeviceGetCurrentClocksThrottleReasons"], handle)
    state = {
        "sm_clock_mhz": mhz("sm_clock_mhz", nvml.NVML_CLOCK_SM),
        "mem_clock_mhz": mhz("mem_clock_mhz", nvml.NVML_CLOCK_MEM),
        "temperature_c": r.get("temperature_c", "nvmlDeviceGetTemperature", handle,
                               nvml.NVML_TEMPERATURE_GPU),
        "power_w": None if power_mw is None else power_mw / 1000,
        "power_limit_w": None if limit_mw is None else limit_mw / 1000,
        "throttle_reasons": None if mask is None else decode_throttle_reasons(int(mask)),
    }
    if r.errors:
        state["errors"] = r.errors
    return state


def nvml_info(torch_index: int = 0) -> dict:
    """GPU identity and state from NVML: {'available': True, ...} or {'available': False, 'reason'}."""
    try:
        import pynvml as nvml  # the module of the nvidia-ml-py package
    except ImportError:
        return {"available": False,
                "reason": "nvidia-ml-py is not installed (pip install nvidia-ml-py)"}
    try:
        nvml.nvmlInit()
    except Exception as err:
        return {"available": False, "reason": f"NVML did not initialise ({type(err).__name__}: {err})"}
    try:
        handle, matched_by = _nvml_handle(nvml, torch_index)
        r = _Reader(nvml)
        capability = r.get("compute_capability", "nvmlDeviceGetCudaComputeCapability", handle)
        memory = r.get("memory_total_gib", "nvmlDeviceGetMemoryInfo", handle)
        mig = r.get("mig_mode", "nvmlDeviceGetMigMode", handle)
        info = {
            "available": True,
            "matched_by": matched_by,
            "name": _text(r.get("name", "nvmlDeviceGetName", handle)),
            "uuid": _text(r.get("uuid", "nvmlDeviceGetUUID", handle)),
            "driver": _text(r.get("driver", "nvmlSystemGetDriverVersion")),
            "compute_capability": None if capability is None else f"{capability[0]}.{capability[1]}",
            "memory_total_gib": None if memory is None else round(memory.total / 2 ** 30, 1),
            "max_sm_clock_mhz": r.get("max_sm_clock_mhz", "nvmlDeviceGetMaxClockInfo", handle,
                                      nvml.NVML_CLOCK_SM),
            "max_mem_clock_mhz": r.get("max_mem_clock_mhz", "nvmlDeviceGetMaxClockInfo", handle,
                                       nvml.NVML_CLOCK_MEM),
            "persistence_mode": r.get("persistence_mode", "nvmlDeviceGetPersistenceMode", handle),
            "mig_mode": None if mig is None else mig[0],
            "state": gpu_state(nvml, handle),
        }
        if r.errors:
            info["errors"] = r.errors
        return info
    except Exception as err:  # a device NVML cannot see, an old driver: say so, carry on
        return {"available": False, "reason": f"NVML query failed ({type(err).__name__}: {err})"}
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def nvml_state(torch_index: int = 0) -> Optional[dict]:
    """The dynamic GPU state only (read after a run to see clocks and throttling), or None."""
    info = nvml_info(torch_index)
    return info.get("state") if info["available"] else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _triton_version() -> Optional[str]:
    try:
        import triton
    except Exception:
        return None
    return triton.__version__


def _backends() -> list:
    try:
        from mvit3.ops import availability

        return [{"backend": b, "available": ok, "reason": why} for b, ok, why in availability()]
    except Exception as err:
        return [{"backend": "?", "available": False, "reason": f"mvit3.ops failed to import: {err}"}]


def collect_env(device: str = "auto") -> dict:
    """Everything that identifies where a result came from.

    `device` "auto" describes the GPU when there is one, else the CPU.
    """
    device = str(device)
    use_cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    index = 0
    if use_cuda and device.startswith("cuda:"):
        index = torch.device(device).index
    env = {
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_type": "cuda" if use_cuda else "cpu",
        "device": torch.cuda.get_device_name(index) if use_cuda else f"CPU: {_cpu_name()}",
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                 "cudnn": torch.backends.cudnn.allow_tf32},
        "git": git_info(),
        "mvit3": mvit3.__version__,
        "gpu": None,
        "nvml": None,
    }
    if use_cuda:
        props = torch.cuda.get_device_properties(index)
        env["gpu"] = {
            "name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_total_gib": round(props.total_memory / 2 ** 30, 1),
        }
        env["nvml"] = nvml_info(index)
    else:
        env["nvml"] = {"available": False, "reason": "no CUDA device: NVML not queried"}
    env["backends"] = _backends()
    return env


def format_env(env: dict) -> list:
    """Markdown bullet lines describing `env`."""
    git = env.get("git") or {}
    commit = git.get("commit") or "unknown"
    if git.get("dirty"):
        commit += " (with uncommitted changes)"
    lines = [f"- device: **{env['device']}**"]
    nvml = env.get("nvml") or {}
    if nvml.get("available"):
        state = nvml.get("state") or {}
        lines.append(f"- GPU: UUID {nvml.get('uuid')}, driver {nvml.get('driver')}, compute "
                     f"capability {nvml.get('compute_capability')}, {nvml.get('memory_total_gib')} GiB, "
                     f"max clocks SM {nvml.get('max_sm_clock_mhz')} / memory "
                     f"{nvml.get('max_mem_clock_mhz')} MHz")
        lines.append(f"- GPU state: SM {state.get('sm_clock_mhz')} MHz, memory "
                     f"{state.get('mem_clock_mhz')} MHz, {state.get('temperature_c')} C, "
                     f"{state.get('power_w')} W of {state.get('power_limit_w')} W, throttle reasons: "
                     f"{', '.join(state.get('throttle_reasons') or []) or 'none'}")
    elif env.get("gpu"):
        lines.append(f"- GPU: compute capability {env['gpu']['compute_capability']}; "
                     f"NVML unavailable: {nvml.get('reason')}")
    else:
        lines.append(f"- no GPU: {nvml.get('reason', 'no CUDA device')}")
    lines.append(f"- torch {env['torch']}, triton {env.get('triton') or 'absent'}, CUDA runtime "
                 f"{env.get('cuda_runtime') or 'none'}, cuDNN {env.get('cudnn') or 'none'}, "
                 f"Python {env['python']}, {env['platform']}")
    lines.append(f"- CPU: {env['cpu']} ({env['cpu_count']} logical cores"
                 + (f", load average {env['loadavg'][0]:.1f} at start" if env.get("loadavg") else "")
                 + ")")
    lines.append(f"- mvit3 {env.get('mvit3')}, commit {commit}; recorded {env['time_utc']}")
    for row in env.get("backends") or []:
        lines.append(f"- backend {row['backend']}: {'available' if row['available'] else 'unavailable'}"
                     f" ({row['reason']})")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvit3.bench.env", description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write the record here instead of stdout")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    text = json.dumps(collect_env(args.device), indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

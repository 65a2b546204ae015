"""What a run's numbers depend on besides its config and seed: CPU, libraries, threads, device.

The same config and seed give bit-identical results on one machine (the
plan fixes every seed and pools the sites' answers in site order), but
floating-point reductions depend on the CPU's vector instructions, the BLAS
/ oneDNN build and the number of threads: MKL, for one, takes other code
paths on AMD than on Intel CPUs.  The summary records these per party, so a
change of machine is visible as such.  Values are short texts (no paths).
"""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata
from typing import Any


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _clean(text: str) -> str:
    return text.replace("/", " ").strip()


def environment() -> dict[str, Any]:
    """CPU, OS, library versions and builds, threads and device of this process."""
    import numpy as np
    import torch

    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    mkl = re.search(r"Math Kernel Library Version ([\w.-]+)", config)
    onednn = re.search(r"MKL-DNN v([\w.]+)", config)
    numpy_blas = None
    try:
        from threadpoolctl import threadpool_info

        numpy_blas = ", ".join(
            sorted(
                f"{i.get('internal_api')} {i.get('version')} ({i.get('num_threads')} threads)"
                for i in threadpool_info()
                if i.get("user_api") == "blas"
            )
        )
    except ImportError:
        pass
    device = f"cuda {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"
    return {
        "cpu": _clean(_cpu_model()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "system": _clean(f"{platform.system()} {platform.release()} {platform.machine()}"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_blas": blas.group(1) if blas else None,
        "mkl": mkl.group(1) if mkl else None,
        "onednn": onednn.group(1) if onednn else None,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "numpy_blas": _clean(numpy_blas) if numpy_blas else None,
        "device": _clean(device),
        "flwr": _version("flwr"),
        "monai": _version("monai"),
    }

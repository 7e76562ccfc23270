"""Before booting: is this kernel fit for the hotplug suite? Reads its config (beside the image,
embedded IKCONFIG, or later /proc/config.gz in the guest) and says plainly what is missing."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from harness.errors import KernelConfigError
from harness.kconfig import memmap_blockers, missing_for_hotplug, parse_config


def check_config_text(config_text: Optional[str], where: str) -> List[str]:
    """Raise KernelConfigError when hotplug itself cannot work; return warnings otherwise."""
    if config_text is None:
        return [f"no kernel config found for {where} (not beside the image, no IKCONFIG); "
                f"running anyway, and /proc/config.gz is read after boot if the kernel has it"]
    cfg = parse_config(config_text)
    missing = missing_for_hotplug(cfg)
    if missing:
        raise KernelConfigError(f"{where}: the kernel config lacks {', '.join(missing)}; "
                                f"memory hot-add/remove cannot be tested")
    return [f"memmap_on_memory cannot apply on this kernel: {b}" for b in memmap_blockers(cfg)]


def check_kernel(kernel) -> List[str]:
    text = None
    if kernel.config:
        try:
            text = Path(kernel.config).read_text(errors="replace")
        except OSError:
            text = None
    if text is None:
        try:
            from harness.kernel import read_ikconfig
            text = read_ikconfig(Path(kernel.image))
        except Exception:
            text = None
    return check_config_text(text, str(kernel.image))

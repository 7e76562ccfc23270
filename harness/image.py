"""guest-images/ recipe -> GuestImage (gzip cpio initramfs + SSH key), cached by input hash."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

READY_MARKER = "MEMHP-GUEST-READY"
GUEST_IP = "10.0.2.15"


@dataclass(frozen=True)
class GuestImage:
    initramfs: Path          # gzip'd newc cpio
    ssh_key: Path            # ed25519 private key (OpenSSH format), mode 0600
    host_key_pub: str        # the guest dropbear's "ssh-ed25519 AAAA..." (pinned by SSH)
    modules: Tuple[str, ...] = ()   # module names init loads, in order
    ready_marker: str = READY_MARKER

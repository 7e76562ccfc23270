"""What report.json records about the kernel: release, spec and the --patch series applied to it.

Each patch is recorded by file name, sha256 and subject line, in the order applied, and copied
into RUN_DIR/patches/ so the run folder stays self-contained: KCIDB's checkout gets
`patchset_hash` (computed from the recorded digests, no file needed) and `patchset_files`
(from the copies), the email and the HTML page name the patches.
"""
from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

PATCH_DIR = "patches"
_SUBJECT = re.compile(r"^Subject:\s*(.*)$", re.I)
_PREFIX = re.compile(r"^\s*(?:\[[^\]]*\]\s*)+")


@dataclass(frozen=True)
class PatchFile:
    file: str           # file name only: a report leaves the machine
    sha256: str         # of the file's bytes, as `sha256sum` prints it
    subject: str        # "mm/memory_hotplug: ..." (the [PATCH n/m] prefix dropped); "" if none


def patch_subject(text: str) -> str:
    """The subject of a patch: its mail Subject header (continuation lines joined, `[PATCH ...]`
    dropped), else the first line of a plain diff's description; "" when there is none."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            break                         # end of the mail headers
        m = _SUBJECT.match(line)
        if m:
            subj = m.group(1)
            for cont in lines[i + 1:]:
                if not cont[:1].isspace():
                    break
                subj += " " + cont.strip()
            return _PREFIX.sub("", subj).strip()
    for line in lines:
        s = line.strip()
        if s.startswith(("diff ", "--- ", "Index: ", "+++ ")):
            return ""
        if s and not s.startswith("From "):
            return s
    return ""


def patch_file(path: Union[str, Path]) -> PatchFile:
    data = Path(path).read_bytes()
    return PatchFile(Path(path).name, hashlib.sha256(data).hexdigest(),
                     patch_subject(data.decode("utf-8", errors="replace")))


def patchset_hash_of_digests(digests: Sequence[str]) -> str:
    """KCIDB's patchset hash from each patch's sha256 (hex), in order; "" for no patches."""
    if not digests:
        return ""
    return hashlib.sha256("".join(d + "\n" for d in digests).encode()).hexdigest()


def kernel_json(release: str, spec: str, patches: Sequence[Union[str, Path]] = (),
                run_dir: Optional[Path] = None) -> Dict[str, Any]:
    """report.json's "kernel" for a run; each patch is copied into run_dir/patches/ when given."""
    doc: Dict[str, Any] = {"release": release, "spec": spec}
    if not patches:
        return doc
    files = [patch_file(p) for p in patches]
    doc["patches"] = [asdict(f) for f in files]
    doc["patchset_hash"] = patchset_hash_of_digests([f.sha256 for f in files])
    if run_dir is not None:
        d = Path(run_dir) / PATCH_DIR
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for p, f in zip(patches, files):
            shutil.copyfile(p, d / f.file)
    return doc

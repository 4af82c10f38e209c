"""Committed expert weights: a byte-reproducible ``.npz`` format guarded by SHA-256.

Nothing is downloaded at run time, so the locomotion experts ship with the package, in
``beyondloss/tasks/experts_data/<name>.npz``, written by
``experiments/train_locomotion_experts.py``.
A file holds the float64 arrays ``weights`` ``(d_act, d_obs)``, ``obs_mean`` and ``obs_std``
``(d_obs,)`` of a linear policy and ``metadata``, a JSON string (environment id, training
config, environment steps, returns). The zip archive is written with fixed timestamps and
member order, so the same arrays always give the same bytes and the same checksum.
:func:`read_expert_file` refuses a file whose SHA-256 differs from the one recorded in
:data:`EXPERT_SHA256`.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType

import numpy as np

EXPERT_SHA256 = MappingProxyType(
    {
        "hopper": "3ad6a166ca7c063ef6d8605651c1b625bef755b3bbb525582f87351efb57e006",
        "halfcheetah": "4f941a489b3ff7ef7b8ee02da261f0725699b3c0d92e0df98b9c95b46e219798",
    }
)
"""Expert name → SHA-256 (hex) of its committed file ``experts_data/<name>.npz``."""

REGENERATE = "python experiments/train_locomotion_experts.py --env {name}"
"""The command that rewrites an expert file (format with the expert's name)."""

_ARRAYS = ("weights", "obs_mean", "obs_std")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class ExpertFile:
    """Contents of one expert file: the linear policy's arrays (float64) and its metadata."""

    weights: np.ndarray
    obs_mean: np.ndarray
    obs_std: np.ndarray
    metadata: dict

    def __post_init__(self) -> None:
        d_act, d_obs = np.shape(self.weights)
        if np.shape(self.obs_mean) != (d_obs,) or np.shape(self.obs_std) != (d_obs,):
            raise ValueError(
                f"obs_mean and obs_std must have shape ({d_obs},) to match weights "
                f"{np.shape(self.weights)}, got {np.shape(self.obs_mean)}, {np.shape(self.obs_std)}"
            )
        if not np.all(np.asarray(self.obs_std) > 0):
            raise ValueError("obs_std must be positive")


def expert_path(name: str) -> Path:
    """Path of the committed file of expert ``name`` inside the installed package."""
    return Path(str(resources.files("beyondloss.tasks") / "experts_data" / f"{name}.npz"))


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of the bytes of ``path``."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_expert_file(path: Path, expert: ExpertFile) -> str:
    """Write ``expert`` to ``path`` (byte-reproducible ``.npz``); returns its SHA-256."""
    arrays = {name: np.asarray(getattr(expert, name), dtype=np.float64) for name in _ARRAYS}
    arrays["metadata"] = np.array(json.dumps(expert.metadata, sort_keys=True))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, array, allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE), member.getvalue())
    Path(path).write_bytes(buffer.getvalue())
    return file_sha256(path)


def read_expert_file(path: Path, sha256: str | None, name: str = "") -> ExpertFile:
    """The expert stored at ``path``, after checking its SHA-256 against ``sha256`` (skipped
    when ``None``). A mismatch raises ``ValueError`` naming the file and the command that
    regenerates expert ``name``."""
    path = Path(path)
    if sha256 is not None:
        actual = file_sha256(path)
        if actual != sha256:
            raise ValueError(
                f"{path}: SHA-256 {actual[:12]}… does not match the recorded {sha256[:12]}…; "
                f"regenerate it with `{REGENERATE.format(name=name or path.stem)}`"
            )
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in _ARRAYS}
        metadata = json.loads(str(data["metadata"]))
    return ExpertFile(**arrays, metadata=metadata)


def load_expert(name: str) -> ExpertFile:
    """The committed expert ``name`` (a key of :data:`EXPERT_SHA256`), checksum verified."""
    if name not in EXPERT_SHA256:
        raise ValueError(f"unknown expert {name!r}; expected one of {', '.join(EXPERT_SHA256)}")
    return read_expert_file(expert_path(name), EXPERT_SHA256[name], name)


__all__ = [
    "EXPERT_SHA256",
    "ExpertFile",
    "expert_path",
    "file_sha256",
    "load_expert",
    "read_expert_file",
    "write_expert_file",
]

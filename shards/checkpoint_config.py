"""A checkpoint's training config, read without importing torch.

``erasure locate`` estimates a retraining from the schedule the ensemble was trained
with, which only the checkpoints record; importing torch to read it costs seconds of
start-up. A checkpoint is a ``torch.save`` zip archive whose ``<name>/data.pkl``
pickles one dict; its tensors are persistent ids into the archive's other entries.
This reader resolves those ids and torch's tensor rebuilders to ``None`` and refuses
every other global (like torch's ``weights_only`` loader, it runs no code of the file),
so the plain parts of the dict (``config``, ``slice_index``, ...) come back as they were.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

_ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict}


class _PlainPartsUnpickler(pickle.Unpickler):
    def persistent_load(self, pid: object) -> None:  # a tensor's storage: not read
        return None

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" or module.startswith("torch."):  # tensor / storage rebuilders
            return _nothing
        raise pickle.UnpicklingError(f"checkpoint refers to {module}.{name}: not a torch.save checkpoint")


def _nothing(*_args: object, **_kwargs: object) -> None:
    return None


def read_checkpoint_fields(path: Path | str) -> dict[str, Any]:
    """The checkpoint's dict with every tensor replaced by ``None``. ValueError when the file
    is not a ``torch.save`` archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickled = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickled) != 1:
                raise ValueError(f"{path}: not a torch.save archive (no single data.pkl)")
            data = _PlainPartsUnpickler(io.BytesIO(archive.read(pickled[0]))).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a checkpoint holds a dict, found {type(data).__name__}")
    return data


def read_train_config(path: Path | str) -> dict[str, Any]:
    """The ``config`` dict (``TrainConfig.to_dict``) of a checkpoint."""
    config = read_checkpoint_fields(path).get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{path}: the checkpoint records no training config")
    return config

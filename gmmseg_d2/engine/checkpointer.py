"""A DetectionCheckpointer whose files are never left half-written."""
import os
import tempfile

import torch

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["AtomicDetectionCheckpointer", "atomic_write_bytes"]


def atomic_write_bytes(path: str, write_fn) -> None:
    """Call ``write_fn(file)`` on a temporary file beside ``path``, then rename it.

    ``os.replace`` is atomic on POSIX, so a crash leaves either the old file
    or the complete new one, never a truncated one.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` with atomic writes for local directories.

    Both the checkpoint and the ``last_checkpoint`` tag are written to a
    temporary file and renamed, so ``--resume`` after a crash mid-save finds
    the previous complete checkpoint. Remote ``save_dir`` URIs fall back to
    the parent's behaviour.
    """

    def _is_local(self) -> bool:
        return bool(self.save_dir) and "://" not in self.save_dir

    def save(self, name: str, **kwargs) -> None:
        if not self._is_local():
            return super().save(name, **kwargs)
        if not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        os.makedirs(self.save_dir, exist_ok=True)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write_bytes(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self._is_local():
            return super().tag_last_checkpoint(last_filename_basename)
        tag_file = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write_bytes(tag_file, lambda f: f.write(last_filename_basename.encode()))

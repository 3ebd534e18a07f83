"""A DetectionCheckpointer whose files are never left half-written.

Files are written to a temporary file beside the target and renamed over it.
The temporary is named ``.<target name>.<host>.<pid>.<8 hex>.tmp``, so that a
writer killed mid-write (``kill -9``, out of memory) leaves an orphan whose
writer can be identified: :func:`remove_orphan_temporaries` deletes those of
dead writers on this host, and :class:`AtomicDetectionCheckpointer` calls it on
its ``save_dir`` when it is created.

It also reads MMSegmentation files directly (:meth:`AtomicDetectionCheckpointer._load_file`):
the official GMMSeg SegFormer checkpoints and MiT ImageNet weights are
converted on load by :mod:`gmmseg_d2.checkpoint_conversion`, so
``MODEL.WEIGHTS official.pth`` works without a conversion step.
"""
import errno
import fnmatch
import logging
import os
import pickle
import re
import secrets
import socket
import stat
from typing import BinaryIO, Callable, List, Sequence

import torch

from detectron2.checkpoint import DetectionCheckpointer

from ..checkpoint_conversion import convert_mit_imagenet, convert_mmseg_segformer, detect_mmseg_checkpoint

__all__ = ["AtomicDetectionCheckpointer", "atomic_write_bytes", "remove_orphan_temporaries"]

#: ``.<target>.<host>.<pid>.<token>.tmp``; ``<host>`` is :func:`_host_tag`.
_TEMPORARY_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>[0-9]+)\.[0-9a-f]{8}\.tmp$")


def _host_tag() -> str:
    """This machine's name, reduced to ``[A-Za-z0-9-]`` (run directories may be on a shared file system)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "localhost"


def _temporary_name(target_basename: str) -> str:
    return f".{target_basename}.{_host_tag()}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _process_is_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (kept on the safe side: unsure means alive)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by another user
        return True
    return True


def atomic_write_bytes(path: str, write_fn: Callable[[BinaryIO], object]) -> None:
    """Call ``write_fn(file)`` on a temporary file beside ``path``, then rename it.

    ``os.replace`` is atomic on POSIX, so a crash leaves either the old file
    or the complete new one, never a truncated one (at worst an orphan
    temporary, see :func:`remove_orphan_temporaries`).

    The file gets the permissions ``open(path, "w")`` would give it: those of
    the file it replaces, else ``0o666`` less the process umask (``0o644``
    under umask 022, ``0o640`` under 027), so that a group sharing a run
    directory can read checkpoints and ``eval_results.json``.
    (``tempfile.mkstemp`` would make them ``0o600``.) The temporary is created
    with ``os.open(..., 0o666)``, which lets the kernel apply the umask (and a
    directory's default ACL) as it does for ``open``; the process-global umask
    is never read or changed.
    """
    directory = os.path.dirname(os.path.abspath(path))
    while True:
        tmp_path = os.path.join(directory, _temporary_name(os.path.basename(path)))
        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            break
        except FileExistsError:  # a 32-bit token collision: draw another
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            try:  # keep the mode of the file being replaced, as open(path, "w") does
                os.fchmod(f.fileno(), stat.S_IMODE(os.stat(path).st_mode))
            except FileNotFoundError:
                pass
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def remove_orphan_temporaries(directory: str, target_patterns: Sequence[str] = ("*",)) -> List[str]:
    """Delete the temporaries :func:`atomic_write_bytes` left in ``directory`` when its writer died.

    Only files named as it names them are considered, whose target name
    matches one of ``target_patterns`` (``fnmatch``), written on this host by
    a process that no longer exists. A live writer's temporary (this process's
    included) is never touched, nor anything on another host, nor any other
    file. Returns the paths removed.
    """
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    host, removed = _host_tag(), []
    for name in names:
        match = _TEMPORARY_NAME.match(name)
        if match is None or match["host"] != host:
            continue
        if not any(fnmatch.fnmatchcase(match["target"], pattern) for pattern in target_patterns):
            continue
        if _process_is_alive(int(match["pid"])):
            continue
        path = os.path.join(directory, name)
        try:
            os.remove(path)
        except OSError as e:  # another process cleaned it first, or it is not ours to delete
            if e.errno != errno.ENOENT:
                logging.getLogger(__name__).warning(f"Could not remove the orphan temporary {path}: {e}")
            continue
        removed.append(path)
    return removed


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` with atomic writes for local directories.

    Both the checkpoint and the ``last_checkpoint`` tag are written to a
    temporary file and renamed, so ``--resume`` after a crash mid-save finds
    the previous complete checkpoint. Remote ``save_dir`` URIs fall back to
    the parent's behaviour.
    """

    #: Names of the files it writes in ``save_dir``, whose orphan temporaries it removes.
    TEMPORARY_TARGETS = ("*.pth", "last_checkpoint")

    def __init__(self, model, save_dir: str = "", **kwargs):
        super().__init__(model, save_dir, **kwargs)
        # A save killed mid-write (kill -9) left `.model_xxx.pth.<host>.<pid>....tmp`
        # beside the checkpoints; remove those of dead writers before writing new ones.
        if self.save_to_disk and self._is_local():
            for path in remove_orphan_temporaries(self.save_dir, self.TEMPORARY_TARGETS):
                self.logger.info(f"Removed the orphan temporary {path} of an interrupted save")

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

    def _torch_load(self, f):
        try:
            return super()._torch_load(f)
        except pickle.UnpicklingError as error:
            # MMSegmentation checkpoints keep Python objects in their "meta"
            # (numpy scalars of the best score, ...), which torch's default
            # weights_only loading refuses.
            self.logger.warning(f"{f}: weights-only loading refused it ({str(error).splitlines()[0]}); loading "
                                f"it as a full pickle (as torch < 2.6 did). Only load checkpoints you trust.")
            return torch.load(f, map_location="cpu", weights_only=False)

    def _load_file(self, filename: str):
        """Detectron2's loading, plus MMSegmentation files converted on the fly:
        a SegFormer / GMMSeg SegFormer ``EncoderDecoder`` checkpoint (the official
        GMMSeg releases) and MiT ImageNet weights (``mit_b*_mmseg.pth`` or the
        original ``mit_b*.pth``, into ``backbone.``)."""
        loaded = super()._load_file(filename)
        kind = detect_mmseg_checkpoint(loaded.get("model"))
        if kind is None:
            return loaded
        state = loaded["model"]
        state = state.get("state_dict", state)
        converted = convert_mmseg_segformer(state) if kind == "segformer" else convert_mit_imagenet(state)
        self.logger.info(f"{filename}: an MMSegmentation {converted.source} checkpoint, converted to gmmseg_d2 "
                         f"names ({len(converted.model)} tensors; dropped, unused by the official model: "
                         f"{converted.dropped or 'none'})")
        return {"model": converted.model, "__author__": f"mmsegmentation:{converted.source}",
                "matching_heuristics": False}

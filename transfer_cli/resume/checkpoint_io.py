"""Lightning's checkpoint files, written atomically and read once.

Lightning's TorchCheckpointIO serializes to memory and then writes the target file in place: a kill -9 or a full
disk during that write leaves a truncated last.ckpt where the previous good one was. Here saves go through
transfer_cli/atomic.py. Loads are served from the checkpoint this command already read (resume/checkpoints.py),
so resuming reads the file from disk once.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from transfer_cli.atomic import atomic_torch_save
from transfer_cli.resume.checkpoints import forget_checkpoint, read_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose saves are atomic and whose loads reuse the command's one read."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        if "://" in str(path):  # a remote file system (s3://, gs://): its own semantics, Lightning's writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None, weights_only: Optional[bool] = None
                        ) -> dict[str, Any]:
        # Lightning's strategies pass no map_location (its default keeps every tensor on the CPU, as here).
        if "://" in str(path) or weights_only is False or map_location is not None:
            kwargs = {} if map_location is None else {"map_location": map_location}
            return super().load_checkpoint(path, weights_only=weights_only, **kwargs)
        checkpoint = read_checkpoint(path)  # weights_only=True, on the CPU
        forget_checkpoint()  # Lightning restores from it and may change it: nothing reads it after this
        return checkpoint


__all__ = ["AtomicCheckpointIO"]

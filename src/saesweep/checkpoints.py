"""Checkpoints of a training job (atomic, the previous one kept; a damaged one found and passed over)
and its stop at a step boundary on a signal from the user or a scheduler."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import signal
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from saesweep.io import atomic_link, atomic_write_bytes

log = logging.getLogger(__name__)

class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file, fsynced, then renamed over the old one: a job killed
    mid-write leaves the previous last.ckpt intact instead of a truncated one. The checkpoint it
    replaces is kept as `previous_checkpoint(path)`, for the day the new one is damaged on disk."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        path = Path(path)
        if path.is_file():
            atomic_link(path, previous_checkpoint(path))
        atomic_write_bytes(path, buffer.getvalue())


def previous_checkpoint(path: Path) -> Path:
    """Where the checkpoint that `path` replaced is kept: last.ckpt → last.previous.ckpt."""
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def readable_checkpoint(last: Path) -> Path | None:
    """The checkpoint to resume from: `last`, or the one it replaced when `last` cannot be read. A
    checkpoint that cannot be read is moved aside (named in one log line), never unpickled beyond
    tensors and plain values; None when no readable one is left, and training starts over."""
    moved = False
    for path in (last, previous_checkpoint(last)):
        if not path.is_file():
            continue
        try:
            torch.load(path, map_location="cpu", weights_only=True)
            return path
        except Exception as e:  # a damaged file fails in many ways (zip, unpickling, EOF, ...)
            aside = path.with_name(f"{path.name}.unreadable-{datetime.now():%Y%m%d-%H%M%S}")
            with contextlib.suppress(FileNotFoundError):  # another DDP rank moved it first
                os.replace(path, aside)
            moved = True
            log.warning("checkpoint %s cannot be read (%s); moved aside to %s", path, _why_unreadable(e), aside.name)
    if moved:
        log.warning("no readable checkpoint is left in %s: training starts over", last.parent)
    return None


def _why_unreadable(error: Exception) -> str:
    # torch's unpickling message advises weights_only=False, which is unsafe advice for a damaged file
    if isinstance(error, pickle.UnpicklingError):
        return "UnpicklingError: it holds something other than tensors and plain values"
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else 'no detail'}"


# What a scheduler sends before it kills a job: Slurm's SIGTERM at the end, SIGUSR1 with --signal (the
# requeue signal Lightning's SLURMEnvironment uses). SIGUSR2 is submitit's preemption signal: it is
# taken only where submitit has a handler for it, which is then called after the checkpoint.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
_CHAINED_SIGNALS = (signal.SIGUSR2,)


class StopOnSignal(L.Callback):
    """Ctrl-C (SIGINT) or a scheduler's signal during training: finish the current step, write
    `checkpoint_path`, stop. `signum` tells the caller which signal stopped it (None: none did).

    Lightning's own handling exits without a checkpoint (and turns SIGTERM into a SystemExit), and a
    signal that lands between the optimizer and scheduler steps would leave them inconsistent;
    waiting for the step boundary avoids both. A second Ctrl-C interrupts at once. A chained signal's
    earlier handler (submitit's requeue) runs once the checkpoint is written.
    """

    def __init__(self, checkpoint_path: Path):
        self.checkpoint_path = Path(checkpoint_path)
        self.signum: int | None = None
        self._previous_handlers: dict[int, Any] = {}

    def _request_stop(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum
        again = " (Ctrl-C again to abort)" if signum == signal.SIGINT else ""
        log.warning("%s: stopping after this step and writing %s%s", signal.Signals(signum).name, self.checkpoint_path, again)

    def on_train_start(self, trainer, pl_module) -> None:
        # not on_fit_start: Lightning records the signal handlers after that hook and puts them back
        # when fit ends, which would reinstall this one after a failed job
        chained = [s for s in _CHAINED_SIGNALS if callable(signal.getsignal(s))]
        for signum in (*STOP_SIGNALS, *chained):
            self._previous_handlers[signum] = signal.signal(signum, self._request_stop)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.signum is not None and not trainer.should_stop:
            trainer.save_checkpoint(self.checkpoint_path, weights_only=False)  # the whole state
            trainer.should_stop = True
            if self.signum in _CHAINED_SIGNALS:
                handler = self._previous_handlers[self.signum]
                self._restore_handlers()
                handler(self.signum, None)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()  # Lightning skips the teardown hooks when fit raises

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            if handler is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(signum, handler)
        self._previous_handlers = {}

"""Pause with a fresh checkpoint: the service writes RUN_DIR/pause.request; at the end of the next step every
rank agrees on it, the Trainer saves a checkpoint there, the status writer writes its step to
RUN_DIR/pause.saved, and the run holds before its next step (no step beyond the checkpoint runs) until the
service, seeing that file, stops it. Resuming starts at that checkpoint."""

from __future__ import annotations

import time

import torch
from transformers import TrainerCallback

from .run_files import RunFiles, writes_status


class PauseCheckpoint(TrainerCallback):
    """Saves a checkpoint at the first step end after a pause request, then holds the run."""

    def __init__(self, files: RunFiles):
        self.request, self.saved = files.pause_request, files.pause_saved
        self.saving = False
        self.holding = False

    def _requested(self, args) -> bool:
        asked = self.request.exists()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # One answer for every rank (a node may not see the file): the save is collective under FSDP.
            flag = torch.tensor([1.0 if asked else 0.0], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            asked = bool(flag.item())
        return asked

    def on_step_end(self, args, state, control, **kw):
        if not self.saving and self._requested(args):
            self.saving = True
            control.should_save = True

    def on_save(self, args, state, control, **kw):
        # Last among the callbacks: the checkpoint is written and recorded when the service is told.
        self.holding = self.saving
        if self.holding and writes_status():
            self.saved.write_text(f"{state.global_step}\n")

    def on_step_begin(self, args, state, control, **kw):
        while self.holding:  # the service stops the run once it sees the checkpoint recorded
            time.sleep(0.2)

"""Append every log record to ``metrics.jsonl`` in the run folder."""

from __future__ import annotations

import json
import os
import time

from transformers import TrainerCallback


class JsonlMetricsCallback(TrainerCallback):
    """Write each Trainer log (training and ``eval_*``) as one JSON line.

    Lines carry ``step``, ``epoch`` and ``time`` (Unix seconds). Each line is
    flushed and fsynced as it is written, so a killed run keeps every line
    logged before it died. Only the main process writes.

    Args:
        path: the ``.jsonl`` file (created with its folder; appended to).
    """

    def __init__(self, path: str):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        rec = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())

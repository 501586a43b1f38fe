"""Measure the kept model every N iterations during training: the progression rows of a steps x loss table."""

from __future__ import annotations

import lightning as L


class EvaluateEvery(L.Callback):
    """After iterations every, 2*every, ... (before the last, which the final evaluation measures), score the
    method's kept model (`export_unet()`: the teacher for distillation) under the label `<method>@<iteration>`.

    Evaluation samples with its own per-seed generators, so training's random stream, and hence the trained
    weights, are the same with or without this callback. Only global rank 0 measures; the others wait.
    A resumed run re-scores the earlier iterations from their cached images, so its table keeps those rows.
    """

    def __init__(self, evaluator, components, every: int, label: str):
        if every < 1:
            raise ValueError(f"eval_every must be >= 1 to evaluate during training, got {every}")
        self.evaluator, self.components, self.every, self.label = evaluator, components, every, label
        self.done: set[int] = set()

    def on_train_start(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        for it in range(self.every, min(pl_module.done_iterations, pl_module.steps - 1) + 1, self.every):
            label = f"{self.label}@{it}"
            if label not in self.evaluator.results and self.evaluator.has_images(label):
                self.evaluator.measure(label, self.components)  # cached: no model runs
                self.done.add(it)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        it = pl_module.done_iterations
        if it % self.every or it >= pl_module.steps or it in self.done:
            return
        self.done.add(it)  # never twice: e.g. an iteration already re-scored by on_train_start
        if trainer.is_global_zero:
            self.evaluator.measure(f"{self.label}@{it}", self.components, unet=pl_module.export_unet())
        trainer.strategy.barrier("eval_every")

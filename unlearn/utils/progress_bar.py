"""The training progress bar in the project's unit, iterations: `train cdc_cpg_tuned 120/300`.

The method stops the trainer itself after `method.steps` iterations, so the trainer runs with max_epochs=-1 and
an endless loader; Lightning's own bar then reads `Epoch 0/-2` with no total. This one shows the iterations done
(a resumed run starts at its checkpoint's count) out of `steps`. Rich when it is installed, as Lightning chooses.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE


def description(pl_module) -> str:
    return f"train {getattr(pl_module, 'method_name', None) or type(pl_module).__name__}"


class RichIterationBar(RichProgressBar):
    @property
    def total_train_batches(self) -> int:
        return int(self.trainer.lightning_module.steps)

    def _get_train_description(self, current_epoch: int) -> str:
        return description(self.trainer.lightning_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # The bar shows batch_idx + 1: hand it the iteration count instead (it counts from a resumed checkpoint).
        super().on_train_batch_end(trainer, pl_module, outputs, batch, pl_module.done_iterations - 1)


class TQDMIterationBar(TQDMProgressBar):
    @property
    def total_train_batches(self) -> int:
        return int(self.trainer.lightning_module.steps)

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(description(trainer.lightning_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, pl_module.done_iterations - 1)


def iteration_bar():
    return RichIterationBar() if _RICH_AVAILABLE else TQDMIterationBar()

"""What a first run shows and does: `prepare: false` generates nothing, `trainer.enable_checkpointing` is read,
the progress bar counts iterations, and a Lightning notice prints once."""

from __future__ import annotations

import io
import logging
from types import SimpleNamespace

import pytest
from toy_helpers import compose_train

TINY = ["method=cdc_cpg", "method.steps=2", "method.warmup_steps=1", "data.num_prompts=2", "data.images_per_prompt=2",
        "data.batch_size=2", "data.gen_batch_size=2", "model.sample_steps=2", "model.guidance_scale=3.0",
        "evaluate=false", "logger=none", "trainer=cpu", "trainer.enable_progress_bar=false", "concept=toy_ring"]


def tiny_cfg(tmp_path, pipeline, *overrides):
    return compose_train(tmp_path, f"model.path={pipeline}", *TINY, *overrides)


def test_prepare_false_generates_nothing(tmp_path, tiny_pipeline_path, monkeypatch):
    from unlearn.data.datamodule import CacheMismatchError, UnlearnDataModule
    from unlearn.train import run

    # An empty cache: refused in one line (the train entry point prints it, exit 2), before the trainer starts.
    with pytest.raises(CacheMismatchError, match=r"^prepare=false: the prepared set .* is incomplete \(2 of 2 "
                                                 r"shards missing\); run python -m unlearn.prepare"):
        run(tiny_cfg(tmp_path / "a", tiny_pipeline_path, "prepare=false"))
    assert not list((tmp_path / "a").glob("cache/prepared/*/*/shards/*"))
    # Prepared first, it trains on that set; Lightning's fit() calls prepare_data and it must generate nothing.
    run(tiny_cfg(tmp_path / "b", tiny_pipeline_path))

    def no_generation(self, *a, **k):
        raise AssertionError("prepare=false generated images")

    monkeypatch.setattr(UnlearnDataModule, "_write_shard", no_generation)
    monkeypatch.setattr(UnlearnDataModule, "_write_embeddings", no_generation)
    shards = sorted((tmp_path / "b").glob("cache/prepared/*/*/shards/*"))
    for shard in shards[1:]:  # a set with a shard missing is incomplete: refused, not completed
        shard.rename(shard.with_name("." + shard.name + ".gone"))
    with pytest.raises(CacheMismatchError, match=r"\(1 of 2 shards missing\)"):
        run(tiny_cfg(tmp_path / "b", tiny_pipeline_path, "prepare=false"))
    for shard in shards[1:]:
        shard.with_name("." + shard.name + ".gone").rename(shard)
    assert run(tiny_cfg(tmp_path / "b", tiny_pipeline_path, "prepare=false", "paths.run_dir=" +
                        str(tmp_path / "b" / "run2")))["pipeline"]


def test_enable_checkpointing_is_read(tmp_path, tiny_pipeline_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from unlearn.train import build_trainer
    from unlearn.utils.checkpoint import IterationCheckpoint

    def kinds(*overrides):
        trainer = build_trainer(tiny_cfg(tmp_path, tiny_pipeline_path, *overrides), tmp_path / "run")
        return {type(c) for c in trainer.callbacks}

    assert ModelCheckpoint not in kinds() and IterationCheckpoint in kinds()  # the run's checkpoints always
    assert {ModelCheckpoint, IterationCheckpoint} <= kinds("trainer.enable_checkpointing=true")


def test_progress_bar_counts_iterations(tmp_path, tiny_pipeline_path):
    from unlearn.train import build_trainer
    from unlearn.utils.progress_bar import RichIterationBar, TQDMIterationBar

    trainer = build_trainer(tiny_cfg(tmp_path, tiny_pipeline_path, "trainer.enable_progress_bar=true"),
                            tmp_path / "run")
    bar = trainer.progress_bar_callback
    assert isinstance(bar, (RichIterationBar, TQDMIterationBar))
    bar._trainer = SimpleNamespace(lightning_module=SimpleNamespace(steps=300, method_name="cdc_cpg_tuned"))
    assert bar.total_train_batches == 300  # Lightning's own: inf, shown as `--`
    if isinstance(bar, RichIterationBar):
        assert bar._get_train_description(0) == "train cdc_cpg_tuned"  # Lightning's own: `Epoch 0/-2`
    assert build_trainer(tiny_cfg(tmp_path, tiny_pipeline_path), tmp_path / "run").progress_bar_callback is None


@pytest.fixture
def lightning_loggers():
    """Lightning's loggers and the root's handlers as a Hydra run leaves them, restored afterwards."""
    from unlearn.utils.quiet import LIGHTNING_LOGGERS

    names = ("", *LIGHTNING_LOGGERS)
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate) for n in names}
    yield
    for n, (handlers, propagate) in saved.items():
        log = logging.getLogger(n)
        log.handlers[:] = handlers
        log.propagate = propagate


def test_a_lightning_notice_prints_once(lightning_loggers):
    from unlearn.utils.quiet import quiet_third_party

    hydra_console, lightning_console = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    root.addHandler(logging.StreamHandler(hydra_console))  # Hydra's job logging: console (and the log file)
    own = logging.StreamHandler(lightning_console)
    own.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))  # lightning/__init__.py's handler
    lightning = logging.getLogger("lightning")
    lightning.setLevel(logging.INFO)
    lightning.handlers[:] = [own]
    for name in ("lightning.fabric", "lightning.pytorch"):  # imported after Hydra set up the root: propagate
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    quiet_third_party()
    logging.getLogger("lightning.fabric.utilities.seed").info("Seed set to 0")
    printed = hydra_console.getvalue().splitlines() + lightning_console.getvalue().splitlines()
    assert printed == ["Seed set to 0"]  # once, through the root's handlers (unfixed: also "INFO: Seed set to 0")

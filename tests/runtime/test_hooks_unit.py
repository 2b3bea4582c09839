"""The hook runner's scopes, which point ``self.log`` at the collector with the running hook's rules."""

from __future__ import annotations

from types import SimpleNamespace

from runtime import LightningModule
from runtime.logging.collector import MetricCollector
from runtime.loops.hooks import HookRunner


def test_a_scope_entered_again_inside_itself_restores_each_outer_hook():
    # One scope object per hook name is reused every step; entering it while it is active must still
    # restore what was active before each entry.
    module = LightningModule()
    collector = MetricCollector(None, training=True)
    engine = SimpleNamespace(lightning_module=module, callbacks=[], gradient_clip_val=None, _active_collector=collector)
    hooks = HookRunner(engine)
    with hooks.scope("on_train_batch_end"):
        with hooks.scope("training_step"):
            with hooks.scope("training_step"):
                assert (module._current_hook, collector.current_fx) == ("training_step", "training_step")
            assert (module._current_hook, collector.current_fx) == ("training_step", "training_step")
        assert (module._current_hook, collector.current_fx) == ("on_train_batch_end", "on_train_batch_end")
        assert module._collector is collector
    assert (module._collector, module._current_hook, collector.current_fx) == (None, None, None)

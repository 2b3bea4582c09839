"""Manual optimization with two optimizers (GAN-style): toggle_optimizer, manual_backward, opt.step, lr_schedulers()."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.parity.bodies import Regressor
from tests.parity.harness import assert_fit_parity, loader, lrs, run_both


class TwoPlayer:
    """A generator/discriminator pair on 4-d data; each optimizer steps once per batch."""

    def __init__(self, d_steps_every: int = 1) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.d_steps_every = d_steps_every
        self.generator = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 4))
        self.discriminator = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.steps_seen: list[int] = []

    def training_step(self, batch, batch_idx):
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        # Noise from the global RNG: both sides must draw the same numbers at the same moments.
        z = torch.randn(real.shape[0], 2)

        self.toggle_optimizer(opt_g)
        fake = self.generator(z)
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(fake), torch.ones(real.shape[0], 1))
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        self.steps_seen.append(self.global_step)

        if batch_idx % self.d_steps_every == 0:
            self.toggle_optimizer(opt_d)
            logits_real = self.discriminator(real)
            logits_fake = self.discriminator(self.generator(z).detach())
            d_loss = F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
            d_loss = d_loss + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
            opt_d.zero_grad()
            self.manual_backward(d_loss)
            self.clip_gradients(opt_d, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
            opt_d.step()
            self.untoggle_optimizer(opt_d)
            self.steps_seen.append(self.global_step)
            self.log("d_loss", d_loss, prog_bar=True)
        self.log_dict({"g_loss": g_loss, "fake_mean": fake.mean()}, on_step=True, on_epoch=True)

        sched_g.step()  # per batch
        if batch_idx == self.trainer.num_training_batches - 1:
            sched_d.step()  # per epoch

    def configure_optimizers(self):
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=0.01)
        opt_d = torch.optim.SGD(self.discriminator.parameters(), lr=0.05, momentum=0.5)
        sched_g = torch.optim.lr_scheduler.ExponentialLR(opt_g, gamma=0.95)
        sched_d = torch.optim.lr_scheduler.StepLR(opt_d, step_size=1, gamma=0.5)
        return [opt_g, opt_d], [sched_g, sched_d]


def test_manual_two_optimizers_gan(tmp_path):
    pl_run, rl_run = run_both(TwoPlayer, tmp_path=tmp_path, trainer_args=dict(max_epochs=2))
    # Sanity of the oracle: every opt.step() counts (6 batches x 2 optimizers x 2 epochs).
    assert pl_run.trainer.global_step == 24
    assert_fit_parity(pl_run, rl_run)
    assert rl_run.model.steps_seen == pl_run.model.steps_seen
    assert lrs(rl_run.model.trainer.optimizers) == lrs(pl_run.model.trainer.optimizers)


def test_manual_optimizer_stepping_every_other_batch(tmp_path):
    pl_run, rl_run = run_both(
        TwoPlayer, tmp_path=tmp_path, init_args={"d_steps_every": 2}, trainer_args=dict(max_epochs=2)
    )
    assert pl_run.trainer.global_step == 18  # 6 generator + 3 discriminator steps per epoch
    assert_fit_parity(pl_run, rl_run)
    assert rl_run.model.steps_seen == pl_run.model.steps_seen


def test_manual_max_steps_counts_optimizer_steps(tmp_path):
    # max_steps counts opt.step() calls; it is checked between batches, so the 5th batch's second step still runs.
    pl_run, rl_run = run_both(TwoPlayer, tmp_path=tmp_path, trainer_args=dict(max_epochs=5, max_steps=9))
    assert pl_run.trainer.global_step == 10
    assert_fit_parity(pl_run, rl_run)
    assert rl_run.model.steps_seen == pl_run.model.steps_seen


class TwoPlayerSchedulerOnLastBatch(TwoPlayer):
    """The Lightning docs' pattern: step the epoch scheduler when ``self.trainer.is_last_batch``."""

    def training_step(self, batch, batch_idx):
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        for opt, net in ((opt_g, self.generator), (opt_d, self.discriminator)):
            loss = net(torch.randn(real.shape[0], 2 if net is self.generator else 4)).pow(2).mean()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        if self.trainer.is_last_batch:
            for sched in self.lr_schedulers():
                sched.step()


def test_manual_scheduler_on_trainer_is_last_batch(tmp_path):
    pl_run, rl_run = run_both(TwoPlayerSchedulerOnLastBatch, tmp_path=tmp_path, trainer_args=dict(max_epochs=2))
    assert_fit_parity(pl_run, rl_run)
    assert lrs(rl_run.model.trainer.optimizers) == lrs(pl_run.model.trainer.optimizers)


class TwoPlayerWithTest(TwoPlayer):
    def test_step(self, batch, batch_idx):
        self.log("d_real", self.discriminator(batch[0]).mean())


def test_test_after_fit_logs_at_the_batch_count_not_the_optimizer_step_count(tmp_path):
    """Two optimizer steps per batch: global_step is 24, but Lightning's logger step counts batches (12)."""
    pl_run, rl_run = run_both(TwoPlayerWithTest, tmp_path=tmp_path, trainer_args=dict(max_epochs=2), with_logger=True)
    rows = {}
    for run in (pl_run, rl_run):
        before = len(run.logger.rows)
        run.trainer.test(run.model, loader(n=8), verbose=False)
        rows[run.side.name] = [(step, sorted(row)) for step, row in run.logger.rows[before:]]
    assert pl_run.trainer.global_step == rl_run.trainer.global_step == 24
    assert rows["lightning"] == [(12, ["d_real", "epoch"])]
    assert rows["raylight"] == rows["lightning"]


class TwoPlayerWithToggledOptimizer(TwoPlayer):
    """The same steps written with the ``with self.toggled_optimizer(opt):`` form (Lightning 2.6)."""

    def training_step(self, batch, batch_idx):
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], 2)
        with self.toggled_optimizer(opt_g):
            assert not any(p.requires_grad for p in self.discriminator.parameters())
            g_loss = self.discriminator(self.generator(z)).pow(2).mean()
            opt_g.zero_grad()
            self.manual_backward(g_loss)
            opt_g.step()
        with self.toggled_optimizer(opt_d):
            d_loss = self.discriminator(real).pow(2).mean()
            opt_d.zero_grad()
            self.manual_backward(d_loss)
            opt_d.step()
        self.steps_seen.append(self.global_step)


def test_toggled_optimizer_context_manager(tmp_path):
    pl_run, rl_run = run_both(TwoPlayerWithToggledOptimizer, tmp_path=tmp_path, trainer_args=dict(max_epochs=1))
    assert_fit_parity(pl_run, rl_run)
    assert all(p.requires_grad for p in rl_run.model.parameters()), "untoggled after the block"


class ManualLBFGS(Regressor):
    """opt.step(closure=...) with an optimizer that evaluates the closure several times."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.closure_calls = 0

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch

        def closure():
            self.closure_calls += 1
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(self(x), y)
            self.manual_backward(loss)
            return loss

        self.log("train_loss", opt.step(closure=closure))

    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=5)


def test_manual_step_with_a_closure_evaluating_optimizer(tmp_path):
    pl_run, rl_run = run_both(ManualLBFGS, tmp_path=tmp_path, trainer_args={"max_epochs": 2})
    assert_fit_parity(pl_run, rl_run)
    assert rl_run.model.closure_calls == pl_run.model.closure_calls > 2 * rl_run.trainer.global_step

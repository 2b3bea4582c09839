"""The smallest end-to-end Ray run: 2 workers, metrics and checkpoints back on the driver."""

import os

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from launcher import Trainer
from runtime import LightningModule, seed_everything


class Lin(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_two_worker_fit_brings_weights_and_checkpoints_back(ray_cluster, tmp_path):
    seed_everything(0)
    x = torch.randn(32, 4)
    model = Lin()
    before = model.net.weight.detach().clone()
    trainer = Trainer(
        max_epochs=1, num_workers=2, address=ray_cluster, default_root_dir=str(tmp_path), run_name="smoke", log_every_n_steps=1,
        enable_progress_bar=False,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8))
    assert trainer.global_step == 2
    assert not torch.equal(before, model.net.weight)
    last = torch.load(tmp_path / "smoke" / "checkpoints" / "last.ckpt", weights_only=True)
    assert torch.equal(last["state_dict"]["net.weight"], model.net.weight.detach())
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "smoke"))

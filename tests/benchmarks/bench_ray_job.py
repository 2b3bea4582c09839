"""Whole-script wall time of one 2-worker Ray job: raylight vs a hand-written Ray Train loop vs Lightning.

    python tests/benchmarks/bench_ray_job.py [--rounds 2] [--variants ...] [--json out.json]

The job, identical in all three: an MLP 32-64-10 on random data, 2 Ray Train
workers on CPU (gloo), 2 epochs x 100 steps per worker (batch 32), a
validation pass each epoch, the training loss logged with a cross-rank mean
every step, and a checkpoint each epoch.

- ``raylight``: ``launcher.Trainer(num_workers=2)`` (checkpoints stream to the
  driver's run directory; progress bar off).
- ``handwritten``: ``ray.train.torch.TorchTrainer`` with a loop written by hand:
  ``prepare_model``/``prepare_data_loader``, an ``all_reduce`` of the loss each
  step, ``ray.train.report(metrics, checkpoint=...)`` each epoch.
- ``lightning``: Lightning 2.6 inside ``TorchTrainer`` with Ray Train's
  Lightning integration (``RayDDPStrategy``, ``RayLightningEnvironment``,
  ``RayTrainReportCallback``, ``prepare_trainer``), as Ray's guide shows.
- ``raylight-ray-knobs`` (not run by default): ``raylight`` with Ray Train's
  default for the knob raylight sets (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=2``
  instead of 0.2), to measure what the knob buys.

Each variant runs as its own Python process (imports, connecting to Ray,
worker start-up and the job itself are all timed, as a user would experience
the script) against one Ray head started here; rounds are interleaved and the
median is reported with the ratios side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

COMMON = textwrap.dedent(
    """
    import os, sys, time, tempfile
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    WORKERS, EPOCHS, STEPS, BATCH = 2, 2, 100, 32
    def dataset(n):
        g = torch.Generator().manual_seed(0)
        return TensorDataset(torch.randn(n, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    TRAIN_N, VAL_N = WORKERS * STEPS * BATCH, WORKERS * 10 * BATCH
    def net():
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    ADDRESS, OUT = sys.argv[1], sys.argv[2]
    """
)

# The same LightningModule for raylight and for Lightning: only the base class differs.
MODEL = textwrap.dedent(
    """
    class Model({base}):
        def __init__(self):
            super().__init__()
            self.net = net()
        def training_step(self, batch, batch_idx):
            loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            self.log("train_loss", loss, sync_dist=True)
            return loss
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", nn.functional.cross_entropy(self.net(batch[0]), batch[1]), sync_dist=True)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)
    """
)

RAYLIGHT = COMMON + textwrap.dedent(
    """
    from launcher import Trainer
    from runtime import LightningModule, ModelCheckpoint

    {model}

    trainer = Trainer(max_epochs=EPOCHS, num_workers=WORKERS, address=ADDRESS, default_root_dir=OUT,
                      enable_progress_bar=False, num_sanity_val_steps=0,
                      callbacks=[ModelCheckpoint(save_last=True)])
    trainer.fit(Model(), DataLoader(dataset(TRAIN_N), batch_size=BATCH), DataLoader(dataset(VAL_N), batch_size=BATCH))
    assert trainer.global_step == EPOCHS * STEPS, trainer.global_step
    """
).replace("{model}", MODEL.format(base="LightningModule"))

HANDWRITTEN = COMMON + textwrap.dedent(
    """
    import ray, ray.train, ray.train.torch
    import torch.distributed as dist

    def loop(config):
        model = ray.train.torch.prepare_model(net())
        train = ray.train.torch.prepare_data_loader(DataLoader(dataset(TRAIN_N), batch_size=BATCH))
        val = ray.train.torch.prepare_data_loader(DataLoader(dataset(VAL_N), batch_size=BATCH))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for epoch in range(EPOCHS):
            if dist.get_world_size() > 1:
                train.sampler.set_epoch(epoch)
            model.train()
            for x, y in train:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                logged = loss.detach().clone()
                dist.all_reduce(logged)
            model.eval()
            total = torch.zeros(2)
            with torch.no_grad():
                for x, y in val:
                    total += torch.stack([nn.functional.cross_entropy(model(x), y) * len(y), torch.tensor(float(len(y)))])
            dist.all_reduce(total)
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if ray.train.get_context().get_world_rank() == 0:
                    torch.save({"model": model.module.state_dict(), "opt": opt.state_dict()}, os.path.join(tmp, "ckpt.pt"))
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report({"val_loss": float(total[0] / total[1]), "epoch": epoch}, checkpoint=checkpoint)

    ray.init(address=ADDRESS, log_to_driver=False)
    ray.train.torch.TorchTrainer(
        loop, scaling_config=ray.train.ScalingConfig(num_workers=WORKERS),
        run_config=ray.train.RunConfig(storage_path=OUT, name="handwritten"),
    ).fit()
    """
)

LIGHTNING = COMMON + textwrap.dedent(
    """
    import ray, ray.train, ray.train.torch
    import lightning.pytorch as pl
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback, prepare_trainer

    {model}

    def loop(config):
        trainer = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices="auto", strategy=RayDDPStrategy(),
                             plugins=[RayLightningEnvironment()], callbacks=[RayTrainReportCallback()],
                             enable_progress_bar=False, num_sanity_val_steps=0, logger=False,
                             enable_checkpointing=False, enable_model_summary=False)
        trainer = prepare_trainer(trainer)
        trainer.fit(Model(), DataLoader(dataset(TRAIN_N), batch_size=BATCH), DataLoader(dataset(VAL_N), batch_size=BATCH))

    ray.init(address=ADDRESS, log_to_driver=False)
    ray.train.torch.TorchTrainer(
        loop, scaling_config=ray.train.ScalingConfig(num_workers=WORKERS),
        run_config=ray.train.RunConfig(storage_path=OUT, name="lightning"),
    ).fit()
    """
).replace("{model}", MODEL.format(base="pl.LightningModule"))

VARIANTS = {"raylight": RAYLIGHT, "handwritten": HANDWRITTEN, "lightning": LIGHTNING, "raylight-ray-knobs": RAYLIGHT}
# The same raylight script with Ray Train's own defaults for the knobs raylight sets (the effect of those knobs).
VARIANT_ENV = {"raylight-ray-knobs": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}}
DEFAULT_VARIANTS = "raylight,handwritten,lightning"


def _run(script: str, address: str, out: str, env: dict[str, str]) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(script)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, f.name, address, out], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    os.remove(f.name)
    if done.returncode != 0:
        raise RuntimeError(f"variant failed:\n{done.stderr[-4000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated, of: {', '.join(VARIANTS)} (default {DEFAULT_VARIANTS})")
    args = parser.parse_args()
    names = [v for v in args.variants.split(",") if v]

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _ray_head import ray_env, ray_head

    env = ray_env()
    with ray_head() as head:
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_idx in range(args.rounds):
            order = names[round_idx % len(names):] + names[: round_idx % len(names)]
            for name in order:
                with tempfile.TemporaryDirectory() as out:
                    times[name].append(_run(VARIANTS[name], head.address, out, {**env, **VARIANT_ENV.get(name, {})}))
                print(f"round {round_idx + 1}: {name} {times[name][-1]:.1f} s", flush=True)

    medians = {name: statistics.median(t) for name, t in times.items()}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"\n2-worker Ray job, 2 epochs x 100 steps per worker; median of {args.rounds} interleaved rounds")
    print(f"machine: {cpu}, {os.cpu_count()} CPUs | python {platform.python_version()}")
    for name in names:
        print(f"{name:12s} {medians[name]:7.1f} s   runs: {', '.join(f'{t:.1f}' for t in times[name])}")
    if "raylight" in medians and "handwritten" in medians:
        print(f"raylight / hand-written Ray Train loop = {medians['raylight'] / medians['handwritten']:.2f}x")
    if "raylight" in medians and "lightning" in medians:
        print(f"raylight / Lightning on Ray Train     = {medians['raylight'] / medians['lightning']:.2f}x")
    if "raylight" in medians and "raylight-ray-knobs" in medians:
        print(f"raylight with Ray Train's default knobs ({VARIANT_ENV['raylight-ray-knobs']}) / raylight = "
              f"{medians['raylight-ray-knobs'] / medians['raylight']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"times": times, "medians": medians}, f, indent=2)


if __name__ == "__main__":
    main()

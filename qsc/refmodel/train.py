"""Train the reference model with the rectified-flow objective Wan uses.

    python -m qsc.refmodel.train --out runs/refmodel --steps 6000 [--minutes 75] [--resume]
    python -m qsc.refmodel.train --out runs/refmodel --device cuda --workers 8 ...   # on a GPU
    python -m qsc.refmodel.train --out runs/stage2 --init qsc/assets/refmodel.safetensors --seed 1 ...
    python -m qsc.refmodel.train --out runs/refmodel --export   # ship the EMA weights

A clip ``x0`` in [-1, 1] and noise ``eps`` are mixed as ``x_t = (1 - t) x0 + t eps``; the model sees
``x_t`` and the timestep ``1000 t`` and is trained to predict the velocity ``eps - x0`` (mean squared
error). ``t`` is logit-normal (SD3/Wan practice: most weight on mid-range noise). The prompt is
dropped to the empty embedding 10% of the time so classifier-free guidance works at sampling time.

Every step's data, noise and ``t`` derive from ``(seed, step)`` alone, so a resumed run sees the same
batches as an uninterrupted one. Checkpoints (raw and EMA weights, optimizer state) are written every
``--save-every`` steps; the EMA weights are what ships.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..fsutil import atomic_directory, atomic_file
from .data import random_batch
from .model import WEIGHTS, build_model
from .prompts import embed

CFG_DROPOUT = 0.1


def training_batch(batch_size: int, seed: int, step: int) -> dict[str, torch.Tensor]:
    """Model inputs and velocity target for one step; a pure function of (seed, step)."""
    prompts, clips = random_batch(batch_size, seed=seed * 1_000_003 + step)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x0 = clips * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.sigmoid(torch.randn(batch_size, generator=g))
    text = torch.cat([embed(p) for p in prompts])
    keep = (torch.rand(batch_size, generator=g) >= CFG_DROPOUT).float()[:, None, None]
    tb = t[:, None, None, None, None]
    return {
        "hidden_states": (1 - tb) * x0 + tb * noise,
        "timestep": t * 1000,
        "encoder_hidden_states": text * keep,
        "target": noise - x0,
    }


class _StepBatches(torch.utils.data.Dataset):
    """Item ``step`` is that step's batch, so DataLoader workers can render ahead of the GPU."""

    def __init__(self, batch_size: int, seed: int):
        self.batch_size, self.seed = batch_size, seed

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        return training_batch(self.batch_size, self.seed, step)


def _batches(args: argparse.Namespace, first_step: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        _StepBatches(args.batch, args.seed), batch_size=None, sampler=range(first_step, args.steps),
        num_workers=args.workers, pin_memory=args.device.startswith("cuda"),
        worker_init_fn=_one_thread_per_worker,
    )


def _one_thread_per_worker(_: int) -> None:
    torch.set_num_threads(1)


class Checkpoint:
    """``model``, ``ema`` (safetensors), ``optimizer.pt`` and ``state.json`` in one directory."""

    def __init__(self, directory: Path):
        self.dir = directory

    def exists(self) -> bool:
        return (self.dir / "state.json").is_file()

    def save(self, step: int, model, ema: dict, optimizer) -> None:
        # All four files replace the old ones together: a run stopped mid-save resumes from the
        # previous checkpoint, never from weights of one step and optimizer state of another.
        with atomic_directory(self.dir, overwrite=True) as tmp:
            save_file({k: v.cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
            save_file({k: v.cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step}))

    def load(self, model, optimizer, device: torch.device) -> tuple[int, dict]:
        model.load_state_dict(load_file(str(self.dir / "model.safetensors")))
        optimizer.load_state_dict(torch.load(self.dir / "optimizer.pt", weights_only=True, map_location=device))
        ema = load_file(str(self.dir / "ema.safetensors"), device=str(device))
        return json.loads((self.dir / "state.json").read_text())["step"], ema


def learning_rate(step: int, peak: float, warmup: int, steps: int, cooldown: int) -> float:
    """Warmup, constant, then a linear cooldown to zero over the last ``cooldown`` steps (the
    warmup-stable-decay schedule: a run can be extended from any pre-cooldown checkpoint)."""
    return peak * min(1.0, (step + 1) / warmup, (steps - step) / max(cooldown, 1))


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    device = torch.device(args.device)
    out = Path(args.out)
    ckpt = Checkpoint(out / "checkpoint")
    model = build_model(args.seed).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    if args.init is not None:  # a new stage: these weights, a fresh optimizer and schedule
        model.load_state_dict(load_file(args.init, device=str(device)))
    step, ema = 0, {k: v.detach().clone() for k, v in model.state_dict().items()}
    if args.resume and ckpt.exists():
        step, ema = ckpt.load(model, optimizer, device)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "train_log.jsonl").open("a")
    started, losses = time.time(), []
    for batch in _batches(args, first_step=step):
        if args.minutes is not None and time.time() - started >= 60 * args.minutes:
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        target = batch.pop("target")
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.lr, args.warmup, args.steps, args.cooldown)
        pred = model(**batch, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        # EMA warms up (decay grows with the step) so early weights do not dominate a short run.
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        losses.append(loss.item())
        if step % args.log_every == 0:
            record = {"step": step, "loss": sum(losses) / len(losses), "lr": optimizer.param_groups[0]["lr"],
                      "elapsed_s": round(time.time() - started, 1)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(json.dumps(record), flush=True)
            losses = []
        if step % args.save_every == 0:
            ckpt.save(step, model, ema, optimizer)
    ckpt.save(step, model, ema, optimizer)
    print(f"stopped at step {step} after {time.time() - started:.0f} s", flush=True)


def export(out: str) -> None:
    """Copy the EMA weights of the run's last checkpoint into the package."""
    with atomic_file(WEIGHTS) as tmp:
        shutil.copyfile(Path(out) / "checkpoint" / "ema.safetensors", tmp)
    print(f"wrote {WEIGHTS}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/refmodel")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--minutes", type=float, default=None, help="stop (and checkpoint) after this long")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--cooldown", type=int, default=0, help="decay the learning rate to 0 over the last N steps")
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="e.g. cuda: the run is the same recipe, only faster")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes rendering batches ahead")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init", default=None, metavar="WEIGHTS",
                   help="start from these weights (e.g. qsc/assets/refmodel.safetensors) with a fresh optimizer")
    p.add_argument("--export", action="store_true", help="only copy the EMA weights into qsc/assets")
    args = p.parse_args(argv)
    export(args.out) if args.export else train(args)


if __name__ == "__main__":
    main()

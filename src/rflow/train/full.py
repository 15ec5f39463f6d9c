"""Full training of a FLUX-architecture model from scratch on the captioned-shapes world.

Flow-matching loss at x_t = (1−t)·x0 + t·noise, t logit-normal: a velocity-predicting model is
trained on the velocity v = noise − x0; a data-predicting model on its x0 error weighted by
1/max(t, x0_weight_floor)² (the velocity error is exactly the x0 error over t, so a floor near 0
is the velocity loss, and 1 the plain x0 loss that weights every noise level alike), AdamW with
linear warm-up and cosine decay, an EMA of the weights, caption dropout (so true CFG works), bf16
autocast on CUDA. Everything random in step ``k`` is drawn from generators seeded by (seed, k), so a
run resumed from a checkpoint continues exactly as if it had never stopped.

Why t leans towards noise (logit mean 1): at 64×64 pixels each 8×8 patch averages away most of the
noise, so at t ≈ 0.9 the background and the objects' rough colours can still be read from x_t itself
and a model trained on logit-normal(0, 1) t (which almost never draws t > 0.95) learns to ignore the
prompt; sampling then starts at t = 1, where only the prompt says what to draw. The same effect is
why FLUX shifts its schedule towards noise for larger images.

Files in the output folder: ``train_state.safetensors`` (weights, EMA, optimizer moments; JSON
metadata with the step, configs and loss log; written atomically) and ``model/`` (an rflow pipeline
folder with the EMA weights, written at the end).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..world import shapes
from ..checkpoints.io import open_weights, save_safetensors
from ..errors import NonFiniteError, UserError
from ..families.base import cond_rows, cond_stack
from ..pipeline import Pipeline, save_pipeline
from .dist import barrier, check_batch, full_tensor, global_mean, like, shard_
from .state import check_settings, load_adam, read_meta

STATE_FILE = "train_state.safetensors"
STATE_VERSION = 1


@dataclass
class TrainConfig:
    steps: int = 4000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 200
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    ema: float = 0.999
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    logit_mean: float = 1.0  # t = sigmoid(N(logit_mean, logit_std)): centred towards noise, see the docstring
    logit_std: float = 1.2
    guidance_range: tuple[float, float] = (1.0, 5.0)
    x0_weight_floor: float = 1.0
    seed: int = 0
    checkpoint_every: int = 250
    model_seed: int = 0

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        p = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def export_path(out: Path, source: Path | None) -> Path:
    """Where a run in ``out`` writes its model: ``model/`` (rflow pipeline folder) or ``model.safetensors``
    (a transformer file, for a source that is not an rflow pipeline folder)."""
    from ..paths import RFLOW_PIPELINE, source_layout

    if source is None or source_layout(source) == RFLOW_PIPELINE:
        return Path(out) / "model"
    return Path(out) / "model.safetensors"


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


def shapes_batch(seed: int, step: int, batch: int) -> tuple[torch.Tensor, list[str]]:
    """Images (B, 3, 64, 64) in [−1, 1] and captions for step ``step``: fresh renders every step."""
    pairs = shapes.samples(batch, seed=(seed * 1_000_003 + step) % (2**32), split="train")
    imgs = np.stack([np.asarray(im, dtype=np.float32) for im, _ in pairs]) / 127.5 - 1.0
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), [c for _, c in pairs]


class TextCache:
    """Frozen text encoders evaluated once per distinct caption; returns the family's conditioning."""

    def __init__(self, pipe: Pipeline):
        self.pipe, self.cache = pipe, {}

    def __call__(self, captions: list[str]):
        new = sorted({c for c in captions if c not in self.cache})
        if new:
            with torch.no_grad():
                rows = cond_rows(self.pipe.encode(new))
            self.cache.update(zip(new, rows))
        return cond_stack([self.cache[c] for c in captions])


class Trainer:
    """``source``: the model path the pipeline was loaded from, when training starts from a model (any
    family); the result is then written like it (rflow.compress.save). Without it the pipeline is a
    fresh rflow-tiny and the result an rflow pipeline folder.

    ``rank``/``world`` (torchrun, :mod:`.dist`): the model is sharded with FSDP2 and each rank trains on
    its share of every global batch of ``cfg.batch`` (the data and noise are drawn for the global batch,
    so a run of any world size sees the same samples); rank 0 alone writes the state and the result."""

    def __init__(self, pipe: Pipeline, cfg: TrainConfig, out: Path,
                 data: Callable[[int, int, int], tuple[torch.Tensor, list[str]]] = shapes_batch,
                 source: Path | None = None, *, rank: int = 0, world: int = 1):
        from ..runtime.offload import streamer

        if streamer(pipe.transformer) is not None:  # streamed weights are frozen views of host buffers
            raise UserError("full training trains every weight, so it cannot stream blocks: load the model with "
                            "offload='none'")
        self.pipe, self.cfg, self.out, self.data, self.source = pipe, cfg, Path(out), data, source
        self.rank, self.world = rank, world
        self.model = pipe.transformer.train().requires_grad_(True)
        if world > 1:
            check_batch(cfg.batch, world)
            shard_(self.model, pipe.family_module.blocks(self.model), world, pipe.device)
        self.ema = {k: v.detach().clone().float() for k, v in self.model.state_dict().items()}
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            (decay if p.ndim >= 2 else no_decay).append(p)
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
        self.text = TextCache(pipe)
        self.step = 0
        self.log: list[dict] = []

    # -- one step ------------------------------------------------------------------------------
    def loss_at(self, step: int) -> torch.Tensor:
        cfg, pipe, dev = self.cfg, self.pipe, self.pipe.device
        g = step_generator(cfg.seed, step)
        images, captions = self.data(cfg.seed, step, cfg.batch)
        B = images.shape[0]
        drop = torch.rand(B, generator=g) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        share = list(range(self.rank, B, self.world))  # this rank's samples of the global batch
        cond = self.text([captions[j] for j in share])
        with torch.no_grad():
            x0 = pipe.vae.encode(images[share].to(dev, pipe.vae.dtype)).float()
        t = torch.sigmoid(torch.randn(B, generator=g) * cfg.logit_std + cfg.logit_mean)[share].to(dev)
        noise = torch.randn((B, *x0.shape[1:]), generator=g)[share].to(dev)
        lo, hi = cfg.guidance_range
        guidance = (lo + (hi - lo) * torch.rand(B, generator=g))[share].to(dev)
        B = len(share)
        if pipe.has_guidance_embedder():  # a distilled-guidance model learns every scale of the range
            cond = dataclasses.replace(cond, guidance=guidance)
        tb = t.view(B, *([1] * (x0.ndim - 1)))
        xt = (1 - tb) * x0 + tb * noise
        denoiser = pipe.denoiser
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            v = denoiser(xt, t, cond.to(dev))
        # the velocity error of a data-predicting model is its x0 error over t, which makes nearly clean
        # samples dominate the loss; the family's weight bounds that (see the module docstring)
        err = (v.float() - (noise - x0)).pow(2).flatten(1).mean(1) * denoiser.loss_weight(t, cfg.x0_weight_floor)
        if self.world == 1:
            return err.mean()
        # FSDP2 averages the ranks' gradients: each rank's sum scaled so that mean is the global batch's mean
        return err.sum() * self.world / self.cfg.batch

    def train_step(self) -> float:
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        loss = self.loss_at(self.step)
        value = global_mean(loss.item(), self.world)
        if not math.isfinite(value):
            raise NonFiniteError(f"the training loss became NaN/inf at step {self.step + 1}; stopped, the last "
                                 f"checkpoint in {self.out} is kept (try a lower --lr)")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if not math.isfinite(float(gnorm)):
            raise NonFiniteError(f"the gradients became NaN/inf at step {self.step + 1}; stopped, the last "
                                 f"checkpoint in {self.out} is kept (try a lower --lr)")
        self.opt.step()
        with torch.no_grad():
            d = min(cfg.ema, (1 + self.step) / (10 + self.step))
            for k, v in self.model.state_dict().items():
                self.ema[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
        self.step += 1
        self.log.append({"step": self.step, "loss": value, "lr": cfg.lr_at(self.step - 1), "grad_norm": float(gnorm)})
        return self.log[-1]["loss"]

    # -- state ---------------------------------------------------------------------------------
    def save_state(self) -> Path | None:
        """Every rank gathers the full tensors (shards); rank 0 writes them and returns the path."""
        t = {f"model.{k}": full_tensor(v.detach()).cpu() for k, v in self.model.state_dict().items()}
        t.update({f"ema.{k}": full_tensor(v).cpu() for k, v in self.ema.items()})
        names = {id(p): n for n, p in self.model.named_parameters()}
        for group in self.opt.param_groups:
            for p in group["params"]:
                st = self.opt.state.get(p)
                if st:
                    n = names[id(p)]
                    t[f"opt.{n}.exp_avg"] = full_tensor(st["exp_avg"]).cpu()
                    t[f"opt.{n}.exp_avg_sq"] = full_tensor(st["exp_avg_sq"]).cpu()
                    t[f"opt.{n}.step"] = torch.as_tensor(full_tensor(st["step"])).float().reshape(1).cpu()
        if self.rank != 0:
            barrier(self.world)  # the state is on disk when save_state returns, on every rank
            return None
        meta = {"rflow.train_state": json.dumps({
            "version": STATE_VERSION, "step": self.step, "train_config": asdict(self.cfg),
            "model_config": self.model.config.to_dict(), "log": self.log})}
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / STATE_FILE
        save_safetensors(t, path, meta)
        barrier(self.world)
        return path

    def load_state(self, path: Path) -> None:
        with open_weights(path) as f:
            meta = read_meta(f, path, "rflow.train_state", STATE_VERSION, "training state")
            if meta["model_config"] != self.model.config.to_dict():
                raise UserError(f"{path}: saved model config differs from this run's")
            check_settings(path, meta["train_config"], self.cfg)
            dev = self.pipe.device
            if self.world == 1:
                self.model.load_state_dict({k[6:]: f.get(k).to(dev) for k in f.keys() if k.startswith("model.")})
            else:  # into this rank's shards
                with torch.no_grad():
                    for k, v in self.model.state_dict().items():
                        v.copy_(like(v, f.get(f"model.{k}")))
            self.ema = {k: like(v, f.get(f"ema.{k}")) for k, v in self.ema.items()}
            names = dict(self.model.named_parameters())
            for n, p in names.items():
                load_adam(f, self.opt, n, p)
        self.step, self.log = int(meta["step"]), list(meta["log"])

    def export(self, path: Path, extra: dict | None = None) -> Path | None:
        """Write the EMA weights: an rflow pipeline folder, or (training started from ``source``) a model
        like the source (:func:`export_path` gives the name). Sharded: every rank gathers, rank 0 writes."""
        if self.world > 1:
            ema = {k: full_tensor(v) for k, v in self.ema.items()}
            if self.rank != 0:
                return None
            plain = self.pipe.family_module.build(self.model.config)
            dtypes = {k: v.dtype for k, v in plain.state_dict().items()}
            plain.load_state_dict({k: v.to(dtypes[k]) for k, v in ema.items()})
            sharded, self.pipe.transformer = self.pipe.transformer, plain.to(self.pipe.device).eval().requires_grad_(False)
            try:
                return self._write(plain, path, extra)
            finally:
                self.pipe.transformer = sharded
        live = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict({k: v.to(live[k].dtype) for k, v in self.ema.items()})
        self.model.eval().requires_grad_(False)
        try:
            return self._write(self.model, path, extra)
        finally:
            self.model.load_state_dict(live)
            self.model.train().requires_grad_(True)

    def _write(self, model, path: Path, extra: dict | None) -> Path:
        if self.source is not None:
            from ..compress.save import save_transformer_like

            return save_transformer_like(self.source, model, path, force=True,
                                         metadata={"rflow.training": extra or {}}).path
        return save_pipeline(self.pipe, path, extra=extra)

    def run(self, *, resume: bool = False, until: int | None = None, progress: Callable[[dict], None] | None = None) -> dict:
        """Train to ``cfg.steps`` (or stop early at ``until``), checkpointing every ``checkpoint_every``."""
        state = self.out / STATE_FILE
        if resume:
            if not state.exists():
                raise UserError(f"{state}: nothing to resume")
            self.load_state(state)
        elif state.exists():
            raise UserError(f"{state} exists: pass --resume to continue it, or choose another output folder")
        stop = min(self.cfg.steps, until) if until is not None else self.cfg.steps
        t0 = time.perf_counter()
        while self.step < stop:
            self.train_step()
            if progress:
                progress(self.log[-1])
            if self.step % self.cfg.checkpoint_every == 0 or self.step == stop:
                self.save_state()
        return {"step": self.step, "seconds": time.perf_counter() - t0,
                "loss": float(np.mean([r["loss"] for r in self.log[-50:]])) if self.log else float("nan")}

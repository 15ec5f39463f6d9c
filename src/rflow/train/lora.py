"""LoRA training of a frozen base model (any family) on a captioned image folder.

The base stays frozen — dense, quantized (:func:`rflow.quant.api.quantize_`, done before the adapters
are added) or streamed by block offload — and trainable adapters are added beside the chosen linear
layers (:func:`rflow.lora.add_lora_`; A random, B zero, so step 0 is the base model). Loss: flow
matching at x_t = (1−t)·x0 + t·noise on the velocity noise − x0, through the family's denoiser and
weighted by its ``loss_weight`` (the x0-error weighting of data-predicting models, as full training)
and, with ``masked_loss``, per latent element by each image's mask (:func:`.data.latent_weight`).
t is drawn uniform, logit-normal(mean, std) or shifted (t' = s·t / (1 + (s−1)·t) of a uniform t, s static
or, for ``shift="auto"``, the factor the model's sampling schedule applies at each bucket's image-token
count: FLUX.1's resolution shift e^mu, mu linear from 0.5 at 256 tokens to 1.15 at 4096).
Models with a guidance embedder (distilled) train at guidance 1.0 unless told otherwise.
AdamW (fused on CUDA) with linear warm-up and cosine decay, gradient accumulation, gradient clipping,
optional gradient checkpointing of every transformer block, an optional EMA of the adapters (decay
min(ema, (1 + step) / (10 + step)), as diffusers' EMAModel) that samples and the exported LoRA use.
Everything the steps read is cached first (latents, captions, sample prompts), so the text encoders can
be unloaded for the rest of the run (:meth:`LoRATrainer.unload_text_encoders`).

Exact resume: everything random in micro-step ``k`` is drawn from generators seeded by (seed, k), and
the data order of epoch ``e`` from (seed, e), so the checkpoint — LoRA tensors, AdamW moments, the step
and the data position, written atomically to ``train_state.safetensors`` — is all a run needs to continue
as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from ..errors import NonFiniteError, UserError
from ..families.base import cond_stack
from ..lora.layer import LoRAWeight, add_lora_, lora_layers, lora_parameters
from .adapters import checkpoint_blocks_, init_weights, target_layers
from .budget import offload_for_training_
from .data import Cache, Item, bucket_for, buckets, check_masks, latent_weight, load_mask
from .dist import barrier, global_sum
from .full import step_generator
from .lora_config import LoRAConfig, sample_t
from .preserve import Preservation, adapter_off, parse_preserve

STATE_FILE = "train_state.safetensors"
LORA_FILE = "lora.safetensors"
STATE_VERSION = 1
NAME = "trained"  # the adapter's name on the model
class LoRATrainer:
    """Trains LoRA ``NAME`` on ``pipe.transformer`` from ``items``; checkpoints and results in ``out``.
    ``rank``/``world``: this process's shard of every global batch (data-parallel runs)."""

    def __init__(self, pipe, cfg: LoRAConfig, items: list[Item], out: Path, *, rank: int = 0, world: int = 1):
        cfg.check()
        self.pipe, self.cfg, self.items, self.out = pipe, cfg, list(items), Path(out)
        self.rank, self.world = rank, world
        model = pipe.transformer
        self.model = model
        self.layers = target_layers(model, cfg.targets)
        alpha = float(cfg.alpha if cfg.alpha is not None else cfg.rank)
        self.alpha = alpha
        options = buckets(cfg.resolution, pipe.size_multiple)
        self.item_buckets = [bucket_for(it.size, options) for it in self.items]
        if pipe.has_guidance_embedder():
            self.guidance = 1.0 if cfg.guidance is None else float(cfg.guidance)
        elif cfg.guidance is not None:
            raise UserError(f"--guidance: this model ({pipe.name}) has no guidance embedder")
        else:
            self.guidance = None
        self._masks: dict[int, torch.Tensor] = {}
        if cfg.masked_loss:
            check_masks(self.items)
        words = parse_preserve(cfg.preserve)
        self.preservation = Preservation(words) if words else None
        weights = init_weights(model, self.layers, cfg.rank, alpha, cfg.seed)
        # an offloaded base: planned again for a training step's working memory (rflow.train.budget),
        # before anything changes (a budget too small for a step is a UserError that leaves the model as it was)
        self.offload = offload_for_training_(
            pipe, self.item_buckets, batch=cfg.batch * (2 if self.preservation is not None else 1),
            checkpointing=cfg.gradient_checkpointing, trainable=sum(w.down.numel() + w.up.numel() for w in weights),
            ema=bool(cfg.ema))
        model.requires_grad_(False)
        add_lora_(model, weights, name=NAME, trainable=True, dtype=torch.float32)
        if cfg.gradient_checkpointing:
            checkpoint_blocks_(model)
        self.params = list(lora_parameters(model, NAME))
        self.names = self._param_names()
        self.ema = [p.detach().clone() for p in self.params] if cfg.ema else None
        fused = {"fused": True} if pipe.device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, **fused)
        settings = f"{getattr(pipe, 'model_hash', '') or pipe.name}|{pipe.max_sequence_length}"
        self.cache = Cache(pipe, self.out / "cache", settings, write=rank == 0)
        self.step, self.log = 0, []
        self._preserve_total = 0.0

    def _param_names(self) -> list[str]:
        out = []
        for lname, (_, stack) in lora_layers(self.model).items():
            for i, p in enumerate(stack.adapters[NAME] if NAME in stack.adapters else ()):
                out += [f"{lname}.{i}.lora_A", f"{lname}.{i}.lora_B"]
        return out

    # -- data ------------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Global batches of epoch ``epoch``: each bucket's images shuffled and cut into batches of
        ``batch × world``, then the batches shuffled; all from (seed, epoch)."""
        g = torch.Generator().manual_seed((self.cfg.seed * 7_919 + epoch) % (2**63))
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(self.item_buckets):
            by_bucket.setdefault(b, []).append(i)
        size = self.cfg.batch * self.world
        out = []
        for b in sorted(by_bucket):
            idx = [by_bucket[b][j] for j in torch.randperm(len(by_bucket[b]), generator=g).tolist()]
            out += [idx[j:j + size] for j in range(0, len(idx), size)]
        return [out[j] for j in torch.randperm(len(out), generator=g).tolist()]

    def micro_batch(self, k: int) -> list[int]:
        """The global batch of micro-step ``k`` (every rank's items; rank r takes its own slice)."""
        epoch, j = 0, k
        while True:
            batches = self.epoch_batches(epoch)
            if j < len(batches):
                return batches[j]
            j, epoch = j - len(batches), epoch + 1

    def _position(self, k: int) -> tuple[int, int]:
        per = len(self.epoch_batches(0))
        return k // per, k % per

    # -- one step ----------------------------------------------------------------------------------
    def loss_at(self, k: int) -> torch.Tensor:
        cfg, pipe, dev = self.cfg, self.pipe, self.pipe.device
        g = step_generator(cfg.seed, k)
        full = self.micro_batch(k)
        n = len(full)
        drop = (torch.rand(n, generator=g) < cfg.caption_dropout).tolist()
        t = sample_t(cfg, n, g, self.shift_factor(self.item_buckets[full[0]]))
        share = [j for j in range(n) if j % self.world == self.rank]  # this rank's shard
        if not share:  # a last, short batch of an epoch: this rank adds nothing (but joins the all-reduce)
            return sum(p.sum() for p in self.params) * 0.0
        x0 = torch.cat([self.cache.latent(self.items[full[j]], self.item_buckets[full[j]]) for j in share])
        noise = torch.randn((n, *x0.shape[1:]), generator=g)[share]  # drawn for the global batch: any world size
        conds = [self.cache.cond("" if drop[j] else self.items[full[j]].caption) for j in share]
        cond = cond_stack(conds)
        if self.guidance is not None:
            cond = dataclasses.replace(cond, guidance=torch.full((len(share),), self.guidance))
        mask = torch.cat([self.loss_mask(full[j]) for j in share]).to(dev) if cfg.masked_loss else 1.0
        x0, noise, t = x0.to(dev), noise.to(dev), t[share].to(dev)
        tb = t.view(-1, *([1] * (x0.ndim - 1)))
        xt = (1 - tb) * x0 + tb * noise
        denoiser = pipe.denoiser
        weight = denoiser.loss_weight(t, cfg.x0_weight_floor)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
        if self.preservation is None:
            with autocast:
                v = denoiser(xt, t, cond.to(dev))
            err = ((v.float() - (noise - x0)).pow(2) * mask).flatten(1).mean(1)
            # mean over the global batch: every rank's sum over the global count
            return (err * weight).sum() / n
        choice = self.preservation.draw(n, g)  # for the global batch, after every other draw
        keep = cond_stack([self.cache.cond(self.preservation.prompt(self.items[full[j]].caption, choice[j]))
                           for j in share])
        if self.guidance is not None:
            keep = dataclasses.replace(keep, guidance=torch.full((len(share),), self.guidance))
        keep = keep.to(dev)
        with torch.no_grad(), adapter_off(self.model, NAME), autocast:
            v_base = denoiser(xt, t, keep).float()
        with autocast:  # one pass over the captions and their preservation prompts
            v, v_keep = denoiser(torch.cat([xt, xt]), torch.cat([t, t]), cond_stack([cond.to(dev), keep])).float().chunk(2)
        err = ((v - (noise - x0)).pow(2) * mask).flatten(1).mean(1)
        drift = (v_keep - v_base).pow(2).flatten(1).mean(1)
        kept = (drift * weight).sum() / n
        self._preserve_total += float(kept.detach()) * cfg.preserve_weight
        return (err * weight).sum() / n + cfg.preserve_weight * kept

    def loss_mask(self, i: int) -> torch.Tensor:
        """Item ``i``'s loss weights on the latent grid (the masked loss), kept in memory once read."""
        if i not in self._masks:
            it, bucket = self.items[i], self.item_buckets[i]
            self._masks[i] = latent_weight(self.pipe.vae, load_mask(it, bucket), self.cfg.mask_floor)
        return self._masks[i]

    def shift_factor(self, bucket: tuple[int, int]) -> float:
        """The model's own timestep shift at ``bucket`` (width, height): what ``--shift auto`` uses."""
        w, h = bucket
        return self.pipe.schedule.shift_factor(self.pipe.family_module.image_seq_len(self.pipe.latent_shape(h, w)))

    def _all_reduce_grads(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)

    def train_step(self) -> dict:
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        total, self._preserve_total = 0.0, 0.0
        for a in range(cfg.grad_accum):
            loss = self.loss_at(self.step * cfg.grad_accum + a) / cfg.grad_accum
            loss.backward()
            total += loss.item()
        total = global_sum(total, self.world)  # each rank's share of the global batch's mean
        if not math.isfinite(total):
            raise NonFiniteError(f"the training loss became NaN/inf at step {self.step + 1}; stopped, the last "
                                 f"checkpoint in {self.out} is kept (try a lower --lr)")
        self._all_reduce_grads()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        if not math.isfinite(float(gnorm)):
            raise NonFiniteError(f"the gradients became NaN/inf at step {self.step + 1}; stopped, the last "
                                 f"checkpoint in {self.out} is kept (try a lower --lr)")
        self.opt.step()
        if self.ema is not None:
            d = min(cfg.ema, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                for e, p in zip(self.ema, self.params):
                    e.lerp_(p.detach(), 1 - d)
        self.step += 1
        row = {"step": self.step, "loss": total, "lr": cfg.lr_at(self.step - 1), "grad_norm": float(gnorm)}
        if self.preservation is not None:  # the preservation term's part of the loss
            row["preserve"] = global_sum(self._preserve_total / cfg.grad_accum, self.world)
        self.log.append(row)
        return row

    # -- state ---------------------------------------------------------------------------------------
    def _meta(self) -> dict:
        k = self.step * self.cfg.grad_accum
        epoch, pos = self._position(k)
        return {"version": STATE_VERSION, "step": self.step, "config": asdict(self.cfg), "layers": self.layers,
                "model": self.cache.settings,
                "data": {"items": [it.digest for it in self.items], "micro_step": k, "epoch": epoch, "batch": pos},
                "rng": {"seed": self.cfg.seed, "scheme": "step-seeded"}, "log": self.log}

    def save_state(self) -> Path | None:
        """Rank 0 writes the state; every rank returns once it is on disk."""
        if self.rank != 0:
            barrier(self.world)
            return None
        from ..checkpoints.io import save_safetensors

        t = {}
        for i, (n, p) in enumerate(zip(self.names, self.params)):
            t[f"lora.{n}"] = p.detach().cpu()
            if self.ema is not None:
                t[f"ema.{n}"] = self.ema[i].detach().cpu()
            st = self.opt.state.get(p)
            if st:
                t[f"opt.{n}.exp_avg"] = st["exp_avg"].cpu()
                t[f"opt.{n}.exp_avg_sq"] = st["exp_avg_sq"].cpu()
                t[f"opt.{n}.step"] = torch.as_tensor(st["step"]).float().reshape(1).cpu()
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / STATE_FILE
        save_safetensors(t, path, {"rflow.lora_train_state": json.dumps(self._meta())})
        barrier(self.world)
        return path

    def load_state(self, path: Path) -> None:
        from ..checkpoints.io import open_weights
        from .state import check_settings, load_adam, read_meta

        with open_weights(path) as f:
            meta = read_meta(f, path, "rflow.lora_train_state", STATE_VERSION, "LoRA training state")
            check_settings(path, meta["config"], self.cfg)
            if meta.get("model") != self.cache.settings or meta.get("layers") != self.layers:
                raise UserError(f"{path}: this run trained another base model (or other layers); resume it with the "
                                "same --model and --targets")
            if meta["data"]["items"] != [it.digest for it in self.items]:
                raise UserError(f"{path}: the dataset changed since this run started; resume with the same images")
            with torch.no_grad():
                for i, (n, p) in enumerate(zip(self.names, self.params)):
                    p.copy_(f.get(f"lora.{n}").to(p.device, p.dtype))
                    load_adam(f, self.opt, n, p)
                    if self.ema is not None:
                        self.ema[i].copy_(f.get(f"ema.{n}").to(p.device, p.dtype))
        self.step, self.log = int(meta["step"]), list(meta["log"])

    @contextlib.contextmanager
    def averaged(self):
        """The EMA weights in the adapters for the ``with`` block (the trained ones without an EMA)."""
        if self.ema is None:
            yield
            return
        with torch.no_grad():
            held = [p.detach().clone() for p in self.params]
            for p, e in zip(self.params, self.ema):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, h in zip(self.params, held):
                    p.copy_(h)

    def trained_weights(self) -> list[LoRAWeight]:
        """The adapters as LoRAWeights (A, B, alpha / rank), for the writers: the EMA when there is one."""
        out = []
        with self.averaged():
            for lname, (_, stack) in lora_layers(self.model).items():
                for p in stack.adapters[NAME] if NAME in stack.adapters else ():
                    out.append(LoRAWeight(lname, p.lora_A.detach().float().cpu().clone(),
                                          p.lora_B.detach().float().cpu().clone(), p.scale, p.offset))
        return out

    def unload_text_encoders(self) -> None:
        """Drop the pipeline's text encoders (after :meth:`run` cached every caption and sample prompt):
        their memory goes back for the rest of the run; captions not cached become an error."""
        self.pipe.text_encoders = None
        if self.pipe.device.type == "cuda":
            torch.cuda.empty_cache()

    def sample(self, prompts: list[str], path: Path, *, steps: int = 20, seed: int = 0) -> Path:
        """Images of ``prompts`` (fixed seeds, Euler, the family's default guidance) with the LoRA as trained
        so far (its EMA when there is one), tiled in one PNG at ``path`` at the first image's bucket.
        The prompts' conditionings come from the cache, so this works with the text encoders unloaded."""
        from PIL import Image

        from .. import sampling
        from ..families.base import Guidance, guided
        from ..outputs import replacing

        pipe, dev = self.pipe, self.pipe.device
        w, h = self.item_buckets[0]
        shape = pipe.latent_shape(h, w, len(prompts))
        cond = cond_stack([self.cache.cond(p) for p in prompts])
        g = pipe.resolve_guidance(None)
        if g is not None:
            cond = dataclasses.replace(cond, guidance=torch.full((len(prompts),), g))
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(dev)
        sigmas = pipe.schedule.sigmas(steps, image_seq_len=pipe.family_module.image_seq_len(shape)).to(dev)
        was = self.model.training
        self.model.eval()
        with torch.no_grad(), self.averaged():
            latent = sampling.sample(guided(pipe.denoiser, cond.to(dev), None, Guidance()), noise, sigmas, "euler")
            ims = pipe.decode(latent)
        self.model.train(was)
        sheet = Image.new("RGB", (w * len(ims), h), "white")
        for i, im in enumerate(ims):
            sheet.paste(im, (i * w, 0))
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp:
            sheet.save(tmp, format="PNG")
        return path

    def export(self, fmt: str = "peft", path: Path | None = None) -> Path:
        from ..lora.write import write_lora

        path = Path(path) if path is not None else self.out / LORA_FILE
        write_lora(path, self.trained_weights(), fam=self.pipe.family_module, model=self.model, rank=self.cfg.rank,
                   alpha=self.alpha, fmt=fmt, extra={"rflow.training": json.dumps({"steps": self.step,
                                                                                   "config": asdict(self.cfg)})})
        return path

    def run(self, *, resume: bool = False, until: int | None = None, progress: Callable[[dict], None] | None = None,
            sample_prompts: list[str] = (), unload_text_encoders: bool = False) -> dict:
        """Cache latents, captions and ``sample_prompts``, then (with the text encoders unloaded if asked)
        train to ``cfg.steps`` (or stop at ``until``), checkpointing every ``checkpoint_every`` steps and at
        the end."""
        state = self.out / STATE_FILE
        if resume:
            if not state.exists():
                raise UserError(f"{state}: nothing to resume")
            self.load_state(state)
        elif state.exists():
            raise UserError(f"{state} exists: pass --resume to continue it, or choose another output folder")
        captions = [it.caption for it in self.items]
        kept = self.preservation.all_prompts(captions) if self.preservation is not None else []
        self.cache.warm(self.items, self.item_buckets, captions + [""] + kept + list(sample_prompts))
        if unload_text_encoders:
            self.unload_text_encoders()
        stop = min(self.cfg.steps, until) if until is not None else self.cfg.steps
        t0 = time.perf_counter()
        while self.step < stop:
            self.train_step()
            if progress:
                progress(self.log[-1])
            if self.step % self.cfg.checkpoint_every == 0 or self.step == stop:
                self.save_state()
        recent = [r["loss"] for r in self.log[-50:]]
        return {"step": self.step, "seconds": time.perf_counter() - t0,
                "loss": sum(recent) / len(recent) if recent else float("nan")}

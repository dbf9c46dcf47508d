"""Optimizer recipes as optax chains (SPEC.md §3–6).

Llama 2 pretraining (§2.2): clip_by_global_norm(1.0) -> AdamW(b1 0.9, b2 0.95, eps 1e-5,
weight decay 0.1), LR linear warmup (2000 steps) then cosine decay to 10% of peak.
The SFT / reward-model / PPO recipes are the same chain with another schedule.

Weight decay: applied to every matrix (embeddings, attention, MLP, output head) and not to the
RMSNorm scales. Decaying a norm scale pulls it towards 0, i.e. towards switching the layer off,
which is not the regularisation intended; Meta's paper does not say, and this is the common
choice (GPT-3, MaxText, levanter). The rule is by logical axis: a parameter whose only
non-"layers" axis is "norm" is exempt.
"""
from __future__ import annotations

import dataclasses
import enum
import math

import jax
import optax
from flax import nnx


class Schedule(str, enum.Enum):
    COSINE = "cosine"      # linear warmup, cosine decay to final_lr_fraction·peak
    CONSTANT = "constant"  # linear warmup, then constant (PPO)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    total_steps: int
    peak_lr: float = 3e-4
    warmup_steps: int = 2000
    warmup_fraction: float | None = None   # if set, warmup = max(min_warmup, fraction·total)
    min_warmup_steps: int = 0
    schedule: Schedule = Schedule.COSINE
    final_lr_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1
    clip_norm: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "schedule", Schedule(self.schedule))
        if self.total_steps < 1:
            raise ValueError(f"OptimConfig.total_steps must be >= 1, got {self.total_steps}")
        if not self.peak_lr > 0:
            raise ValueError(f"OptimConfig.peak_lr must be > 0, got {self.peak_lr}")
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"OptimConfig.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        for name in ("warmup_steps", "min_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"OptimConfig.{name} must be >= 0, got {getattr(self, name)}")
        # The cosine needs at least one step after warmup (optax: "positive decay_steps").
        if self.warmup > self.total_steps or (
                self.schedule is Schedule.COSINE and self.warmup >= self.total_steps):
            source = ("warmup_steps" if self.warmup_fraction is None else
                      "warmup_fraction" if self.warmup > self.min_warmup_steps else "min_warmup_steps")
            raise ValueError(
                f"OptimConfig.{source}: warmup ({self.warmup} steps) must be shorter than "
                f"total_steps ({self.total_steps}), leaving steps for the {self.schedule.value} "
                f"schedule; lower {source} or raise total_steps")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"OptimConfig.final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")
        for name in ("b1", "b2"):  # Adam's moment decays: 1 would never forget, >1 diverges
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"OptimConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0:
            raise ValueError(f"OptimConfig.eps must be > 0 (it keeps Adam's division finite), "
                             f"got {self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"OptimConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.clip_norm <= 0:
            raise ValueError(f"OptimConfig.clip_norm must be > 0, got {self.clip_norm}")

    @property
    def warmup(self) -> int:
        if self.warmup_fraction is None:
            return self.warmup_steps
        return max(self.min_warmup_steps, math.ceil(self.warmup_fraction * self.total_steps))


def llama2_pretrain(total_steps: int, peak_lr: float = 3e-4, warmup_steps: int = 2000) -> OptimConfig:
    """§2.2: peak 3e-4 (7B/13B) or 1.5e-4 (34B/70B), warmup 2000, cosine to 10%."""
    return OptimConfig(total_steps=total_steps, peak_lr=peak_lr, warmup_steps=warmup_steps)


def llama2_sft(total_steps: int) -> OptimConfig:
    """§3.1: cosine from 2e-5, weight decay 0.1 (no warmup stated)."""
    return OptimConfig(total_steps=total_steps, peak_lr=2e-5, warmup_steps=0)


def llama2_reward_model(total_steps: int, peak_lr: float = 1e-5) -> OptimConfig:
    """§3.2.2: max LR 1e-5 (5e-6 for 70B), cosine to 10%, warmup 3% of steps with a minimum of 5."""
    return OptimConfig(total_steps=total_steps, peak_lr=peak_lr, warmup_fraction=0.03,
                       min_warmup_steps=5)


def llama2_ppo(total_steps: int) -> OptimConfig:
    """§3.2.3: constant LR 1e-6, same AdamW and clipping."""
    return OptimConfig(total_steps=total_steps, peak_lr=1e-6, warmup_steps=0,
                       schedule=Schedule.CONSTANT)


def learning_rate(cfg: OptimConfig) -> optax.Schedule:
    """lr(step): 0 -> peak linearly over `warmup` steps, then cosine / constant."""
    w = cfg.warmup
    if cfg.schedule is Schedule.CONSTANT:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.peak_lr, w), optax.constant_schedule(cfg.peak_lr)], [w])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.peak_lr, warmup_steps=w, decay_steps=cfg.total_steps,
        end_value=cfg.final_lr_fraction * cfg.peak_lr)


def decay_mask(params: nnx.State) -> nnx.State:
    """True for parameters that get weight decay (see the module docstring)."""

    def decays(v: nnx.Variable) -> bool:
        names = [n for n in v.get_metadata().get("logical_axes", ()) if n != "layers"]
        return names != ["norm"]

    return jax.tree.map(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(cfg: OptimConfig, params: nnx.State) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW with the schedule and the decay mask for `params`.

    `params` is the nnx.State of the parameters (its metadata gives the mask); the returned
    transformation works on the pure-dict form of the same tree.
    """
    mask = nnx.to_pure_dict(decay_mask(params))
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=mask),
    )

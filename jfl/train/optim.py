"""Optimizer: AdamW + global-norm clipping + warm-up/constant LR, with frozen parameters masked.

Which parameters train is `config.optim.frozen`: path prefixes into params = {"model": ..., "repa":
...} such as "model/siglip" or "model/llm" (whole path components). Frozen leaves are labelled
"frozen" and go through `optax.set_to_zero()` inside `optax.multi_transform`, so they hold no
optimizer state; `apply_updates` leaves them bit-identical.
"""

import jax
import optax

TRAIN, FROZEN = "train", "frozen"


def path_str(path) -> str:
  """'model/llm/layers/mlp/up_proj/kernel' for a jax key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def matches_prefix(path: str, prefix: str) -> bool:
  """True when `prefix` names `path` or one of its parent groups (whole path components)."""
  return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def param_labels(params, frozen: tuple[str, ...]):
  """Tree of TRAIN / FROZEN strings matching `params`; ValueError for a prefix that matches nothing."""
  paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for prefix in frozen:
    if not any(matches_prefix(p, prefix) for p in paths):
      tops = sorted({"/".join(p.split("/")[:2]) for p in paths})
      raise ValueError(f"optim.frozen: {prefix!r} matches no parameter; top-level groups: {', '.join(tops)}")
  return jax.tree_util.tree_map_with_path(
      lambda p, _: FROZEN if any(matches_prefix(path_str(p), f) for f in frozen) else TRAIN, params)


def schedule(optim_config) -> optax.Schedule:
  """Linear warm-up from 0 to `lr` over `warmup_steps`, then constant."""
  lr, warmup = float(optim_config.lr), int(optim_config.warmup_steps)
  if warmup <= 0:
    return optax.constant_schedule(lr)
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])


def make_optimizer(optim_config, labels) -> optax.GradientTransformation:
  """AdamW(b1, b2, eps, weight_decay) after clipping the trainable grads to `clip_norm`."""
  c = optim_config
  adamw = optax.chain(
      optax.clip_by_global_norm(float(c.clip_norm)),
      optax.adamw(schedule(c), b1=float(c.b1), b2=float(c.b2), eps=float(c.eps), weight_decay=float(c.weight_decay)),
  )
  return optax.multi_transform({TRAIN: adamw, FROZEN: optax.set_to_zero()}, labels)


def apply_updates(params, updates, labels):
  """params + updates on trainable leaves; frozen leaves are returned as they are."""
  return jax.tree.map(lambda p, u, l: p if l == FROZEN else (p + u).astype(p.dtype), params, updates, labels)


def ema_update(ema, params, labels, decay: float):
  """ema <- decay * ema + (1 - decay) * params on trainable leaves; frozen leaves unchanged."""
  return jax.tree.map(lambda e, p, l: e if l == FROZEN else decay * e + (1.0 - decay) * p, ema, params, labels)

"""Train state, a pure train step with a NaN/Inf guard and optional EMA, and its jitted sharded form."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # micro-steps taken (calls of the train step that were applied)
  params: Any
  opt_state: Any
  ema_params: Optional[Any]
  rng: jax.Array

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, rng, use_ema: bool = False,
             clip: Optional[jax.Array] = None) -> "TrainState":
    """A fresh state; with ``clip`` (``objective.clip_search``) a :class:`ClippedTrainState`."""
    ema = jax.tree.map(jnp.copy, params) if use_ema else None
    fields = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema_params=ema, rng=rng)
    return TrainState(**fields) if clip is None else ClippedTrainState(**fields, clip=clip)


class ClippedTrainState(TrainState):
  """A TrainState that also carries the noise interval ``objective.clip_search`` moves during training.

  A class of its own rather than an optional field: orbax records even a None field in the checkpoint's tree, so a
  ``clip=None`` field would make every checkpoint written before it unrestorable."""

  clip: jax.Array  # float32[2] [low, high], passed to the loss as ``clip=`` (traced: moving it never recompiles)


def state_shardings(abstract_state: TrainState, param_shardings, mesh) -> TrainState:
  """Shardings for a TrainState: params/EMA and every optimizer subtree shaped like params follow
  ``param_shardings``; all other leaves (counts, scalars, rng) are replicated."""
  replicated = NamedSharding(mesh, P())
  param_def = jax.tree.structure(abstract_state.params)
  is_param_tree = lambda x: jax.tree.structure(x) == param_def and not isinstance(x, jax.ShapeDtypeStruct)

  def opt_map(x):
    if is_param_tree(x):
      return param_shardings
    return jax.tree.map(lambda _: replicated, x)

  opt_sh = jax.tree.map(opt_map, abstract_state.opt_state, is_leaf=is_param_tree)
  fields = dict(step=replicated, params=param_shardings, opt_state=opt_sh,
                ema_params=None if abstract_state.ema_params is None else param_shardings, rng=replicated)
  if isinstance(abstract_state, ClippedTrainState):
    return ClippedTrainState(**fields, clip=replicated)
  return TrainState(**fields)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, ema_decay: Optional[float] = None,
                    lr_schedule: Optional[Callable] = None, grad_accum_steps: int = 1):
  """``(state, batch) -> (state, metrics)``; pure, jit-able.

  ``loss_fn(params, batch, rng) -> (loss, metrics)``; a :class:`ClippedTrainState` calls
  ``loss_fn(params, batch, rng, clip=state.clip)``. If the loss, gradients, grad norm or updated parameters are
  not finite the OLD state is returned unchanged and ``metrics['nonfinite'] == 1``; the caller should stop and save.
  With ``optax.MultiSteps`` (grad_accum_steps > 1) each call is one micro-step; EMA moves only on real updates.
  """

  def step_fn(state: TrainState, batch):
    rng, step_rng = jax.random.split(state.rng)
    kwargs = {"clip": state.clip} if isinstance(state, ClippedTrainState) else {}
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, step_rng, **kwargs)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    new_ema = state.ema_params
    if state.ema_params is not None:
      if ema_decay is None:
        raise ValueError("state has ema_params but make_train_step got ema_decay=None.")
      updated = (new_opt_state.mini_step == 0 if isinstance(new_opt_state, optax.MultiStepsState)
                 else jnp.array(True))  # MultiSteps applies the update when mini_step wraps to 0
      d = jnp.where(updated, ema_decay, 1.0)
      new_ema = jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), state.ema_params, new_params)
    new_state = state.replace(step=state.step + 1, params=new_params, opt_state=new_opt_state,
                              ema_params=new_ema, rng=rng)
    # The updated parameters too: a NaN/inf learning rate (or an overflowing update) gives finite grads but NaN
    # params. Under jit on sharded arrays this is one all-reduced bool.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(grads) & _all_finite(new_params)
    out_state = jax.lax.cond(finite, lambda: new_state, lambda: state)
    metrics = dict(aux) if isinstance(aux, dict) else {}
    metrics.update(loss=loss, grad_norm=grad_norm, nonfinite=(~finite).astype(jnp.int32))
    if lr_schedule is not None:
      metrics["lr"] = jnp.asarray(lr_schedule(state.step // grad_accum_steps), jnp.float32)
    return out_state, metrics

  return step_fn


class NonFiniteError(FloatingPointError, ValueError):
  """Raised by :func:`raise_if_nonfinite` and the trainer; the state passed to the failing step is intact and can be
  saved. A ValueError too, so the CLI reports it as ``error: ...`` (its cause is a setting or the data)."""


def raise_if_nonfinite(metrics, step) -> None:
  """Host-side check for the trainer: a clear error when the train step reported ``nonfinite=1``."""
  if int(metrics.get("nonfinite", 0)):
    raise NonFiniteError(
        f"Non-finite loss or gradient at step {int(step)} (loss={float(metrics['loss'])}, "
        f"grad_norm={float(metrics['grad_norm'])}). The update was skipped and the state is unchanged; save it and "
        "lower the learning rate, check the data, or raise optimizer.clip_norm/warmup.")


def jit_train_step(step_fn, state_shardings_tree, batch_sharding):
  """jit with explicit in/out shardings; the input state is donated."""
  return jax.jit(step_fn, in_shardings=(state_shardings_tree, batch_sharding),
                 out_shardings=(state_shardings_tree, None), donate_argnums=0)

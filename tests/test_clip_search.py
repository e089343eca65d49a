"""BD3-LM's clipped-schedule search (objective.clip_search): the per-block NELBO it collects, the argmin it picks,
the traced interval of the loss and the train state, its config checks, and a training run with it on."""

import json

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ardiff import masks, objectives
from ardiff.config import ModelConfig
from ardiff.model import Transformer, init_params
from ardiff.objectives import base, schedules
from ardiff.training import clip_search, train_state

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-dominated, see conftest.py

V, MASK, BS = 32, 31, 4
CFG = ModelConfig(vocab_size=V, embed_dim=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32,
                  mask_token_id=MASK)
MODEL = Transformer(CFG)
PARAMS = init_params(CFG, jax.random.key(0))
OBJ = objectives.ObjectiveConfig(block_size=BS, clip_search=True, clip_search_widths=(0.5, 0.9),
                                 clip_search_delta=0.25, clip_search_batches=2)


def batch(seed, pad_from=None):
  x = jax.random.randint(jax.random.key(seed), (2, 16), 0, MASK)
  seg = jnp.ones((2, 16), jnp.int32)
  if pad_from is not None:
    seg = seg.at[1, pad_from:].set(0)
  return {"tokens": x, "segment_ids": seg}


def test_per_block_nelbo_is_the_block_mean_of_the_1_over_t_weighted_masked_ce():
  """Recomputed by hand from the same draws: model forward on [x_t ; x_0] with the BD3 mask, CE of the masked tokens
  times 1/t, averaged over the B positions of each block; an all-padding block has no targets."""
  b = batch(1, pad_from=8)  # row 1: blocks 2 and 3 are padding
  cfg = objectives.ObjectiveConfig(block_size=BS, weighting="p_mask")  # the statistic is 1/t-weighted regardless
  nelbo, has_targets = clip_search.make_per_block_fn(MODEL, cfg)(PARAMS, b, jax.random.key(7), low=0.2, high=0.7)
  assert nelbo.shape == has_targets.shape == (2, 4)
  np.testing.assert_array_equal(np.asarray(has_targets), [[1, 1, 1, 1], [1, 1, 0, 0]])

  @jax.jit  # (jit only to keep the test fast)
  def by_hand(b):
    rng_t, rng_m = jax.random.split(jax.random.key(7))
    t = 0.2 + 0.5 * schedules.antithetic_uniform(rng_t, (2, 4))
    t_tok = jnp.repeat(t, BS, axis=1)
    pb = base.prepare_batch(b)
    maskable = pb.loss_mask & ~base.document_starts(pb.segment_ids)
    masked = maskable & (jax.random.uniform(rng_m, (2, 16)) < t_tok)
    x_t = jnp.where(masked, MASK, b["tokens"])
    logits = MODEL.apply({"params": PARAMS}, jnp.concatenate([x_t, b["tokens"]], axis=1), mask=masks.BD3(16, BS),
                         positions=jnp.concatenate([pb.positions] * 2, axis=1),
                         segment_ids=jnp.concatenate([pb.segment_ids] * 2, axis=1)).logits[:, :16]
    ce = base.gather_nll(base.log_probs(logits, MASK), b["tokens"])
    return jnp.where(masked, ce / t_tok, 0.0).reshape(2, 4, BS).mean(-1), jnp.sum(masked)

  want, num_masked = by_hand(b)
  assert int(num_masked) > 0
  np.testing.assert_allclose(np.asarray(nelbo), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_search_picks_the_argmin_of_hand_computed_variances():
  batches = [batch(2), batch(3, pad_from=12)]
  rng = jax.random.key(11)
  per_block_fn = clip_search.make_per_block_fn(MODEL, OBJ)  # one compile for the hand computation and the search
  cands = schedules.candidate_intervals(OBJ.clip_search_widths, delta=OBJ.clip_search_delta)
  assert cands == [(0.001, 0.5), (0.001, 0.9), (0.25, 0.75), (0.5, 1.0)]
  variances = {}
  for lo, hi in cands:  # every candidate on the same batches and the same draws (common random numbers)
    values = []
    for j, b in enumerate(batches):
      nelbo, ok = per_block_fn(PARAMS, b, jax.random.fold_in(rng, j), low=lo, high=hi)
      values.append(np.asarray(nelbo)[np.asarray(ok)])
    values = np.concatenate(values).astype(np.float64)
    assert values.size == 8 + 7  # the padding block of the second batch is left out
    variances[(lo, hi)] = np.mean((values - values.mean()) ** 2)
  want = min(variances, key=variances.get)
  assert len(set(variances.values())) == len(cands)  # a real choice, not a tie

  best, min_var = clip_search.search(PARAMS, iter(batches + [batch(4)]), OBJ,  # the third batch is beyond the limit
                                     per_block_fn=per_block_fn, rng=rng)
  assert best == want
  np.testing.assert_allclose(min_var, variances[want], rtol=1e-4)
  assert clip_search.schedule_metrics(best, min_var) == {"schedule/clip_low": best[0],
                                                         "schedule/clip_high": best[1],
                                                         "schedule/min_variance": min_var}


def test_search_without_validation_batches_is_a_clear_error():
  with pytest.raises(ValueError, match="no validation batches"):
    clip_search.search(PARAMS, iter([]), OBJ, per_block_fn=clip_search.make_per_block_fn(MODEL, OBJ),
                       rng=jax.random.key(0))


def test_traced_clip_interval_matches_the_configured_one_and_moves_the_draws():
  b = batch(5)
  loss_fn = jax.jit(objectives.make_loss_fn(MODEL, objectives.ObjectiveConfig(block_size=BS)))
  rng = jax.random.key(2)
  default, _ = loss_fn(PARAMS, b, rng)
  same, _ = loss_fn(PARAMS, b, rng, clip=jnp.array([1e-3, 1.0], jnp.float32))
  np.testing.assert_allclose(float(same), float(default), rtol=1e-6)
  narrow_cfg = objectives.ObjectiveConfig(block_size=BS, clip_low=0.3, clip_high=0.6)
  narrow, m = jax.jit(objectives.make_loss_fn(MODEL, narrow_cfg))(PARAMS, b, rng)
  traced, m_traced = loss_fn(PARAMS, b, rng, clip=jnp.array([0.3, 0.6], jnp.float32))
  np.testing.assert_allclose(float(traced), float(narrow), rtol=1e-6)
  assert float(m_traced["mask_rate"]) == float(m["mask_rate"]) != float(_["mask_rate"])


def test_train_step_passes_the_state_interval_to_the_loss():
  seen = []

  def loss_fn(params, batch, rng, clip=None):
    seen.append(clip)
    return jnp.sum(params["w"] ** 2) * (1.0 if clip is None else clip[1]), {}

  params = {"w": jnp.ones((3,))}
  tx = optax.sgd(0.1)
  plain = train_state.TrainState.create(params, tx, jax.random.key(0))
  assert type(plain) is train_state.TrainState
  step = jax.jit(train_state.make_train_step(loss_fn, tx))
  _, m_plain = step(plain, {})
  with_clip = train_state.TrainState.create(params, tx, jax.random.key(0), clip=jnp.array([0.1, 0.5]))
  assert isinstance(with_clip, train_state.ClippedTrainState)
  new, m_clip = step(with_clip, {})
  assert seen[0] is None and seen[1] is not None
  np.testing.assert_allclose(float(m_clip["loss"]), 0.5 * float(m_plain["loss"]), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(new.clip), np.float32([0.1, 0.5]))


class _StateBeforeClipSearch(flax.struct.PyTreeNode):
  """TrainState as it was before the clipped-schedule search existed."""
  step: jax.Array
  params: dict
  opt_state: tuple
  ema_params: dict
  rng: jax.Array


def test_a_checkpoint_written_before_the_search_existed_still_restores(tmp_path):
  from ardiff.checkpoints.checkpointer import Checkpointer
  params, tx = {"w": jnp.arange(6.0).reshape(2, 3)}, optax.adam(1e-3)
  state = train_state.TrainState.create(params, tx, jax.random.key(1))
  old = _StateBeforeClipSearch(state.step, state.params, state.opt_state, state.ema_params, state.rng)
  with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    ckpt.save(3, old, force=True)
    step, restored = ckpt.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                               state))
  assert step == 3 and type(restored) is train_state.TrainState
  np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.asarray(params["w"]))


@pytest.mark.parametrize("fields,message", [
    (dict(kind="tidar"), "needs objective.kind='block_diffusion'"),
    (dict(weighting="p_mask"), "needs objective.weighting='nelbo'"),
    (dict(clip_search_widths=(0.5, 1.5)), r"clip_search_widths=\(0.5, 1.5\) must be"),
    (dict(clip_search_widths="wide"), "must be a tuple of numbers"),
    (dict(clip_search_delta=0.0), "clip_search_delta=0.0 must lie in"),
    (dict(clip_search_every=-1), "clip_search_every=-1 must be an integer >= 0"),
    (dict(clip_search_batches=0), "clip_search_batches=0 must be an integer >= 1"),
])
def test_bad_clip_search_configs_raise(fields, message):
  with pytest.raises(ValueError, match=message):
    objectives.ObjectiveConfig(clip_search=True, **fields)


def test_clip_search_config_round_trips_through_json():
  cfg = objectives.ObjectiveConfig.from_dict(json.loads(json.dumps({"clip_search": True,
                                                                    "clip_search_widths": [0.5, 0.7]})))
  assert cfg.clip_search_widths == (0.5, 0.7) and hash(cfg)
  assert clip_search.search_every(cfg, eval_every=25) == 25
  assert clip_search.search_every(objectives.ObjectiveConfig(clip_search=True, clip_search_every=3), 25) == 3
  assert clip_search.search_every(objectives.ObjectiveConfig(), 25) == 0
  np.testing.assert_array_equal(np.asarray(clip_search.initial_clip(cfg)), np.float32([1e-3, 1.0]))
  assert clip_search.initial_clip(objectives.ObjectiveConfig()) is None


def _run_config(run_dir, data_dir, **objective):
  from ardiff import experiment
  c = experiment.base_config()
  c.model.update(embed_dim=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)
  c.objective.update(block_size=BS, **objective)
  c.data.update(seq_len=16, data_dir=data_dir)
  c.mesh.update(data=1, fsdp=1, tensor=1)
  c.optimizer.update(warmup_steps=1)
  c.train.update(run_dir=str(run_dir), batch_size=4, num_steps=4, log_every=1, eval_every=100, eval_batches=1,
                 save_every=2, num_samples=0)
  return c


def _rows(run_dir):
  return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def _losses(rows):
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_training_with_the_search_logs_the_interval_trains_on_it_and_resumes_with_it(tmp_path):
  """Off: the loss never sees an interval argument; on: the same losses until the first search (the traced
  [clip_low, clip_high] is the configured interval, bit for bit), then the chosen interval, logged and checkpointed,
  so a run stopped after the search and resumed reproduces the uninterrupted one."""
  from ardiff.training import main as train_main
  data_dir = str(tmp_path / "tfds")
  search = dict(clip_search=True, clip_search_every=2, clip_search_widths=(0.5, 0.9), clip_search_delta=0.25,
                clip_search_batches=2)
  train_main.train(_run_config(tmp_path / "off", data_dir), progress=False, stop_after=3)
  train_main.train(_run_config(tmp_path / "on", data_dir, **search), progress=False)
  off, on = _losses(_rows(tmp_path / "off")), _losses(_rows(tmp_path / "on"))
  assert sorted(on) == [1, 2, 3, 4] and all(np.isfinite(v) for v in on.values())
  assert on[1] == off[1] and on[2] == off[2]
  sched = [r for r in _rows(tmp_path / "on") if "schedule/clip_low" in r]
  assert [r["step"] for r in sched] == [2]  # every 2 steps, none after the last step
  interval = (sched[0]["schedule/clip_low"], sched[0]["schedule/clip_high"])
  assert interval in schedules.candidate_intervals((0.5, 0.9), delta=0.25)
  assert np.isfinite(sched[0]["schedule/min_variance"]) and sched[0]["schedule/min_variance"] > 0
  assert on[3] != off[3]  # training now draws t from the chosen interval (no candidate is the full [1e-3, 1])
  ev = train_main.evaluate_run(str(tmp_path / "on"), max_batches=1)  # its checkpoints read like any other run's
  assert np.isfinite(ev["nelbo_per_token"])

  config = _run_config(tmp_path / "resumed", data_dir, **search)
  train_main.train(config, progress=False, stop_after=2)  # stops right after the search (and its save)
  train_main.train(config, progress=False)
  assert _losses(_rows(tmp_path / "resumed")) == on

  with pytest.raises(ValueError, match="clip_search=False, but the checkpoints .* were trained with clip_search=True"):
    train_main.train(_run_config(tmp_path / "resumed", data_dir), progress=False)  # the search switched off

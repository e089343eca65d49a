"""Confidence distillation (ardiff/training/distill.py): the loss equals a hand computation on a tiny case, the data
are the AR teacher's own samples (deterministic under a seed), and the fine-tune loop moves the student."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff.config import ModelConfig
from ardiff.model import Transformer, init_params
from ardiff.objectives import diffusion
from ardiff.objectives.base import ObjectiveConfig
from ardiff.sampling import sample_ar
from ardiff.training import distill

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-dominated, see conftest.py

CFG = ModelConfig(vocab_size=7, embed_dim=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32,
                  mask_token_id=6)
OBJ = ObjectiveConfig(kind="block_diffusion", block_size=2)


def test_distill_terms_match_a_hand_computation():
  logits = np.array([[[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [1.0, 1.0, 3.0], [0.0, 0.0, 0.0]]])  # [1, 4, 3]
  targets = np.array([[0, 2, 2, 1]])
  masked = np.array([[True, True, True, False]])
  weight = np.array([[2.0, 4.0, 1.5, 9.0]], np.float32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  # ce: the weighted NLL of the three masked positions over the 4 maskable ones
  ce_hand = (2.0 * -logp[0, 0, 0] + 4.0 * -logp[0, 1, 2] + 1.5 * -logp[0, 2, 2]) / 4
  # certainty: mean entropy where argmax == target among masked: positions 0 (argmax 0) and 2 (argmax 2), not 1
  ent = lambda i: -(np.exp(logp[0, i]) * logp[0, i]).sum()
  cert_hand = (ent(0) + ent(2)) / 2
  ce, cert = distill.distill_terms(jnp.asarray(logp, jnp.float32), jnp.asarray(targets),
                                   diffusion.Noise(jnp.asarray(masked), jnp.asarray(weight)), 4)
  np.testing.assert_allclose([float(ce), float(cert)], [ce_hand, cert_hand], rtol=1e-6)
  # nothing predicted right: the certainty term is 0, not 0/0
  _, cert0 = distill.distill_terms(jnp.asarray(logp, jnp.float32), jnp.asarray([[1, 0, 0, 1]]),
                                   diffusion.Noise(jnp.asarray(masked), jnp.asarray(weight)), 4)
  assert float(cert0) == 0.0


@pytest.fixture(scope="module")
def teacher_and_student():
  model = Transformer(CFG)
  return model, init_params(CFG, jax.random.PRNGKey(1)), init_params(CFG, jax.random.PRNGKey(2))


def test_teacher_samples_are_the_teachers_and_deterministic(teacher_and_student):
  model, teacher, _ = teacher_and_student
  prompts = np.array([[5, 1, 0], [5, 2, 3]], np.int32)
  lens = np.array([2, 3], np.int32)
  a = distill.teacher_samples(teacher, model, prompts, lens, rng=jax.random.key(7), num_tokens=5)
  b = distill.teacher_samples(teacher, model, prompts, lens, rng=jax.random.key(7), num_tokens=5)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  ref = sample_ar(teacher, model, prompts, lens, rng=jax.random.key(7), max_new_tokens=5)
  gen = np.asarray(ref.tokens)
  for r in range(2):
    p = lens[r]
    np.testing.assert_array_equal(a.tokens[r, :p], prompts[r, :p])
    np.testing.assert_array_equal(a.tokens[r, p:p + 5], gen[r])
    assert a.loss_mask[r].sum() == 5 and a.loss_mask[r, p:p + 5].all()
    assert a.segment_ids[r, :p + 5].all() and not a.segment_ids[r, p + 5:].any()
  c = distill.teacher_samples(teacher, model, prompts, lens, rng=jax.random.key(8), num_tokens=5)
  assert not np.array_equal(a.tokens, c.tokens)  # another seed, other samples


def test_distill_loss_and_finetune(teacher_and_student):
  model, teacher, student = teacher_and_student
  prompts = np.tile(np.array([[5, 1, 0]], np.int32), (4, 1))
  lens = np.array([1, 2, 3, 2], np.int32)
  data = distill.teacher_samples(teacher, model, prompts, lens, rng=jax.random.key(0), num_tokens=5)  # width 8
  batch = {"tokens": data.tokens, "segment_ids": data.segment_ids, "loss_mask": data.loss_mask}
  loss_fn = jax.jit(lambda p, b, k: distill.distill_loss(p, b, k, model=model, cfg=OBJ, certainty_weight=0.5))
  loss, m = loss_fn(student, batch, jax.random.key(3))
  np.testing.assert_allclose(float(loss), float(m["ce"]) + 0.5 * float(m["certainty"]), rtol=1e-6)
  # the ce term is BD3's own loss on the same batch and noise
  bd3, _ = jax.jit(lambda p, b, k: diffusion.block_diffusion_loss(p, b, k, model=model, cfg=OBJ))(
      student, batch, jax.random.key(3))
  np.testing.assert_allclose(float(m["ce"]), float(bd3), rtol=1e-6)
  tuned, hist = distill.finetune(student, model, OBJ, data, steps=2, batch_size=2, learning_rate=1e-2)
  assert len(hist) == 2 and np.isfinite([h["loss"] for h in hist]).all()
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), tuned, student)
  assert max(jax.tree.leaves(moved)) > 0
  with pytest.raises(ValueError, match="batch_size=9 must lie in"):
    distill.finetune(student, model, OBJ, data, steps=1, batch_size=9)
  with pytest.raises(ValueError, match="block-diffusion student"):
    distill.distill_loss(student, batch, jax.random.key(3), model=model, cfg=ObjectiveConfig(kind="ar"),
                         certainty_weight=0.5)

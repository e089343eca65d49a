"""Block-diffusion sampler options of issue 16: AdaBlock-style adaptive block ends (``delimiters``).

Cheap identities on the tiny model of tests/test_sampling_laws.py: with every token a delimiter and threshold 0 the
rule commits only the leftmost masked position (== ``sub_block_size=1``, left-to-right decoding), compared token for
token, greedy, on a ragged batch; the rule itself on hand-made cases.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff.sampling import sample_block_diffusion
from ardiff.sampling.commit_rules import semantic_prefix
from test_sampling_laws import MASK, VOCAB, models  # noqa: F401

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-dominated, see conftest.py


def test_semantic_prefix_rule():
  masked = jnp.array([[False, True, True, True], [True, True, True, True], [True, True, False, True]])
  tokens = jnp.array([[7, 7, 1, 7], [1, 2, 7, 7], [3, 3, 7, 7]])
  conf = jnp.array([[1.0, 0.95, 0.99, 0.99], [0.5, 0.5, 0.95, 0.99], [0.9, 0.9, 0.99, 0.99]])
  got = semantic_prefix(masked, tokens, conf, (7,), 0.9)
  np.testing.assert_array_equal(np.asarray(got), [[False, True, False, False],  # position 0 is not masked
                                                  [True, True, True, False],  # first confident delimiter: 2
                                                  [True, True, False, True]])  # unmasked 7 does not count
  with pytest.raises(ValueError, match="delimiters"):
    from ardiff.sampling.block_diffusion_options import BlockDiffusionOptions
    BlockDiffusionOptions(block_size=4, num_blocks=1, mask_id=5, vocab_size=6, delimiters=(6,))


def test_delimiter_option_limits_commits(models):
  model, params, _, _ = models
  prompt = np.array([[2, 0, 3, 1, 4], [1, 4, 0, 0, 0]], np.int32)
  lens = np.array([5, 2], np.int32)
  run = lambda **kw: sample_block_diffusion(params, model, prompt, lens, rng=jax.random.PRNGKey(0), block_size=4,
                                            num_blocks=3, strategy="topk_confidence", steps_per_block=1,
                                            greedy=True, **kw)
  every = tuple(t for t in range(VOCAB) if t != MASK)
  left_to_right, ada = run(sub_block_size=1), run(delimiters=every, delimiter_threshold=0.0)
  np.testing.assert_array_equal(np.asarray(ada.tokens), np.asarray(left_to_right.tokens))
  assert int(ada.nfe) == int(left_to_right.nfe) > int(run().nfe)

"""The backbone: a Llama-style decoder in Flax Linen, shared by the AR, block-diffusion and TiDAR families.

What makes one family differ from another is not the network but the **mask** it is called with
(:mod:`ardiff.masks`) and the tokens/positions it is fed. So the decoder takes

* ``tokens [batch, length]`` and explicit ``positions [batch, length]`` (the two halves of BD3's
  ``[x_t ; x_0]`` share positions),
* ``mask``: a static :class:`ardiff.masks.Mask`,
* optional ``segment_ids [batch, length]`` (packed documents never attend across documents; 0 = padding),
* optional ``cache`` (:class:`KVCache`): the forward then writes the new tokens' K/V at each row's
  ``lengths`` and attends to the cache prefix plus themselves. ``lengths`` is *not* advanced: a denoising step
  reuses the same slots; the caller commits with :meth:`KVCache.advance` (and rewinds by lowering lengths).

Parameter names are Hugging Face Llama/Qwen2 names (``embed_tokens``, ``layers/self_attn/q_proj``, ``mlp/gate_proj``,
``input_layernorm``, ``norm``, ``lm_head``) and RoPE uses HF's rotate-half convention, so checkpoints map one to one.
Every parameter and activation carries logical axis names (``batch, length, embed, heads, kv_heads, head_dim,
mlp, vocab, layers``); sharding is a rules table in the config (:mod:`ardiff.sharding`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ardiff import attention as attention_lib
from ardiff import masks as masks_lib
from ardiff.rope import apply_rope  # noqa: F401  (its home is ardiff.rope; model.apply_rope kept for callers)
from ardiff.config import ModelConfig
from kernels_pallas import block_sparse_attention as block_sparse_lib


@flax.struct.dataclass
class KVCache:
  """Static-shape K/V cache. ``k``, ``v``: ``[layers, batch, max_len, kv_heads, head_dim]``; ``lengths``: ``[batch]``
  = number of committed (clean) entries per row (ragged batches are exact: each row writes at its own length)."""

  k: jax.Array
  v: jax.Array
  lengths: jax.Array

  @classmethod
  def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    dtype = dtype or config.compute_dtype
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.k.shape[2]

  def advance(self, n) -> "KVCache":
    """Commit ``n`` (scalar or ``[batch]``) of the entries written by the last forward."""
    return self.replace(lengths=self.lengths + jnp.asarray(n, jnp.int32))

  def rewind_to(self, lengths) -> "KVCache":
    """Set the committed lengths (e.g. drop rejected draft tokens); stale entries past them are never read."""
    return self.replace(lengths=jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), self.lengths.shape))


class ModelOutput(NamedTuple):
  logits: jax.Array  # float32 [batch, length, vocab]
  hidden: jax.Array  # [batch, length, embed], after the final norm
  cache: Optional[KVCache]


def linear(x, kernel, n_contract: int = 1):
  """``x [..., K1..Kn] . kernel [K1..Kn, N...] -> [..., N...]``: contracts x's last ``n_contract`` axes with the
  kernel's first ``n_contract``.

  On CPU this is one 2-D GEMM ``[rows, K] @ [K, N]`` (free reshapes): XLA:CPU lowers the backward's weight-gradient
  dot of a 3-D einsum (``dot(x^T, dy)`` contracting batch *and* length) through explicit transposes of both
  activations into plain Eigen dots, which made the SwiGLU MLP's forward + backward ~2x slower than the same 2-D
  matmuls (measured: ``benchmarks/train_throughput.py``); the 2-D form keeps every dot in XNNPACK/YNNPACK or a
  transpose-free Eigen call. Other platforms get ``tensordot`` (their compilers fold the batch axes themselves, and
  sharded activations keep their 3-D layout). The choice is made at lowering, for the platform compiled for (an
  AOT TPU compile from a CPU host gets the TPU form)."""
  k = math.prod(kernel.shape[:n_contract])
  lead, out = x.shape[:x.ndim - n_contract], kernel.shape[n_contract:]
  if x.shape[x.ndim - n_contract:] != kernel.shape[:n_contract]:
    raise ValueError(f"linear: x's last {n_contract} axes {x.shape[x.ndim - n_contract:]} != kernel's first "
                     f"{kernel.shape[:n_contract]}.")
  as_gemm = lambda x, w: (x.reshape(-1, k) @ w.reshape(k, -1)).reshape(*lead, *out)
  as_tensordot = lambda x, w: jnp.tensordot(x, w, n_contract)
  return jax.lax.platform_dependent(x, kernel, cpu=as_gemm, default=as_tensordot)


def _trailing_contraction(equation: str) -> Optional[int]:
  """``n`` if ``equation`` is ``"<lead><K>,<K><N>-><lead><N>"`` (x's last ``n`` letters = the kernel's first ``n``,
  kept axes in order), i.e. a :func:`linear`; None for any other einsum."""
  inputs, output = equation.replace(" ", "").split("->")
  xs, ws = inputs.split(",")
  for n in range(1, min(len(xs), len(ws)) + 1):
    if xs[len(xs) - n:] == ws[:n] and output == xs[:len(xs) - n] + ws[n:]:
      return n
  return None


def _dense_init(config: ModelConfig, axes):
  return nn.with_logical_partitioning(nn.initializers.normal(config.init_std), axes)


class RMSNorm(nn.Module):
  config: ModelConfig
  axes: tuple = ("embed",)  # ("head_dim",) for Qwen3's per-head q/k norms

  @nn.compact
  def __call__(self, x):
    weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, self.axes),
                        (x.shape[-1],), self.config.weight_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.rms_norm_eps)
    return weight.astype(self.config.compute_dtype) * normed.astype(self.config.compute_dtype)


class Projection(nn.Module):
  """A multi-axis linear map whose kernel is created in its full shape, so its logical axis names apply as they
  are (``nn.DenseGeneral`` initialises a flattened 2-D kernel, which breaks 3-axis annotations under a mesh)."""

  config: ModelConfig
  shape: tuple
  axes: tuple
  equation: str
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kernel = self.param("kernel", _dense_init(cfg, self.axes), self.shape, cfg.weight_dtype)
    x, kernel = x.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype)
    contract = _trailing_contraction(self.equation)
    y = jnp.einsum(self.equation, x, kernel) if contract is None else linear(x, kernel, contract)
    if self.use_bias:  # one bias per output feature: the kernel axes that reach the output ([H, hd] or [D])
      inputs, output = self.equation.split("->")
      out = [i for i, c in enumerate(inputs.split(",")[1]) if c in output]
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, tuple(self.axes[i] for i in out)),
                        tuple(self.shape[i] for i in out), cfg.weight_dtype)
      y = y + bias.astype(cfg.compute_dtype)
    return y


class Attention(nn.Module):
  """``query_len``: only the first ``query_len`` positions are queries (all of them are keys and values)."""
  config: ModelConfig
  mask: masks_lib.Mask
  query_len: Optional[int] = None

  @nn.compact
  def __call__(self, x, positions_bt, segment_ids_bt, cache_k, cache_v, cache_lengths):
    """``x``: ``[batch, length, embed]`` -> ``([batch, query_len or length, embed], new (k, v) cache or None)``."""
    cfg = self.config
    # Einsum letters: b batch, t length, d embed, n heads, h head_dim.
    n = x.shape[1] if self.query_len is None else self.query_len
    if n != x.shape[1] and cache_k is not None:
      raise ValueError(f"query_len={n} is for uncached forwards; a cached forward's queries are all its tokens.")
    q_positions = positions_bt[:, :n]
    q_segment_ids = None if segment_ids_bt is None else segment_ids_bt[:, :n]

    q = Projection(cfg, (cfg.embed_dim, cfg.num_heads, cfg.head_dim), ("embed", "heads", "head_dim"),
                   "btd,dnh->btnh", use_bias=cfg.qkv_bias, name="q_proj")(x[:, :n])
    k = Projection(cfg, (cfg.embed_dim, cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"),
                   "btd,dnh->btnh", use_bias=cfg.qkv_bias, name="k_proj")(x)
    v = Projection(cfg, (cfg.embed_dim, cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"),
                   "btd,dnh->btnh", use_bias=cfg.qkv_bias, name="v_proj")(x)
    if cfg.qk_norm:  # Qwen3: RMSNorm over head_dim of every head, before RoPE
      q = RMSNorm(cfg, ("head_dim",), name="q_norm")(q)
      k = RMSNorm(cfg, ("head_dim",), name="k_norm")(k)
    q = apply_rope(q, q_positions, cfg.rope_theta, cfg.rope_scaling_dict)
    k = apply_rope(k, positions_bt, cfg.rope_theta, cfg.rope_scaling_dict)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
    k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
    v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))

    new_kv = None
    if cache_k is None:
      out = attention_lib.attention(q, k, v, mask=self.mask, impl=cfg.attention_impl,
                                    q_segment_ids=q_segment_ids, kv_segment_ids=segment_ids_bt)
    else:
      if segment_ids_bt is not None:
        raise ValueError("segment_ids are for packed training batches; a cached forward takes one sequence per "
                         "row (ragged rows are handled by the cache's per-row lengths).")
      write = jax.vmap(lambda c, new, s: jax.lax.dynamic_update_slice(c, new.astype(c.dtype), (s, 0, 0)))
      cache_k, cache_v = write(cache_k, k, cache_lengths), write(cache_v, v, cache_lengths)
      new_kv = (cache_k, cache_v)
      out = attention_lib.attention(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), mask=self.mask,
                                    impl=cfg.attention_impl, q_offsets=cache_lengths,
                                    kv_lengths=cache_lengths + x.shape[1])
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
    o = Projection(cfg, (cfg.num_heads, cfg.head_dim, cfg.embed_dim), ("heads", "head_dim", "embed"),
                   "btnh,nhd->btd", use_bias=cfg.o_bias, name="o_proj")(out)
    return o, new_kv


class Mlp(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    """``[batch, length, embed]`` -> ``[batch, length, embed]``."""
    cfg = self.config
    # nn.Dense's parameter names and shapes (kernel [in, out], bias [out]), through Projection's linear map
    dense = lambda shape, axes, name: Projection(cfg, shape, axes, "btd,df->btf", use_bias=cfg.mlp_bias, name=name)
    gate = dense((cfg.embed_dim, cfg.mlp_dim), ("embed", "mlp"), "gate_proj")(x)
    up = dense((cfg.embed_dim, cfg.mlp_dim), ("embed", "mlp"), "up_proj")(x)
    # The backward pass recomputes silu(gate) * up from gate and up (kept anyway: the dots' outputs) instead of
    # keeping sigmoid(gate) and silu(gate) as more [batch, length, mlp] residuals per layer (XLA:CPU faults in its
    # temp arena afresh every step, so each residual byte costs time there; -7% of the CPU train step's temp).
    h = jax.checkpoint(lambda g, u: nn.silu(g) * u)(gate, up)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return dense((cfg.mlp_dim, cfg.embed_dim), ("mlp", "embed"), "down_proj")(h)


class DecoderLayer(nn.Module):
  """``query_len``: the layer's output is its first ``query_len`` positions (all of them are keys and values)."""
  config: ModelConfig
  mask: masks_lib.Mask
  query_len: Optional[int] = None

  @nn.compact
  def __call__(self, x, positions_bt, segment_ids_bt, cache_k, cache_v, cache_lengths):
    attn_out, new_kv = Attention(self.config, self.mask, self.query_len, name="self_attn")(
        RMSNorm(self.config, name="input_layernorm")(x), positions_bt, segment_ids_bt, cache_k, cache_v,
        cache_lengths)
    h = x[:, :attn_out.shape[1]] + attn_out
    h = h + Mlp(self.config, name="mlp")(RMSNorm(self.config, name="post_attention_layernorm")(h))
    h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
    return h, new_kv


# The dots policies also save the Pallas attention forward's output and logsumexp (by checkpoint name): the kernel
# is not a dot, so without them the backward pass would run the attention forward a second time per layer.
_SAVE_ATTENTION = jax.checkpoint_policies.save_only_these_names(*block_sparse_lib.RESIDUAL_NAMES)
_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.checkpoint_dots,
                                                            _SAVE_ATTENTION),
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _SAVE_ATTENTION),
}


def _stacked_layer_params(variables) -> dict:
  """The ``[layers, ...]`` parameters of the scanned stack (``params/layers``), plain arrays."""
  if "params" not in variables or "layers" not in variables["params"]:
    raise ValueError("scan_layers=True, but the parameters have no 'layers' stack (keys: "
                     f"{sorted(variables.get('params', {}))}); were they made with scan_layers=False? Build the "
                     "model with the same scan_layers as the checkpoint.")
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, variables["params"]["layers"],
                      is_leaf=is_box)


def _layer_stack(cfg: ModelConfig, mask, stacked: dict, x, positions_bt, segment_ids_bt, out_len: int):
  """The ``scan_layers`` decoder stack of an uncached forward: ``x [batch, length, embed]`` through every layer of
  ``stacked`` (each leaf ``[layers, ...]``, the layout ``nn.scan`` creates and checkpoints hold), returning the first
  ``out_len`` positions ``[batch, out_len, embed]``. Unrolled, the last layer computes only those rows.

  Compiled for CPU the layers are unrolled; elsewhere they are a rolled ``lax.scan``. Rolled, the backward pass
  reads its residuals from ``[layers, ...]`` stacks that the loop zero-fills, writes with dynamic-update-slice,
  copies and slices again; XLA:CPU runs all of that (and first-touches the stacks' pages on every step, its temp
  arena being a fresh allocation per execution): measured a third of the CPU train step's op time at the
  issue-19 shape. TPU/GPU keep the rolled loop (compile time, and the schedule their memory estimates assume).
  The choice is made at lowering (``lax.platform_dependent``), for the platform compiled for, so an AOT TPU
  compile from a CPU host gets the rolled loop. Cached forwards do not come here: they keep ``nn.scan`` (rolled on
  every platform), so the stacked K/V cache is updated in place and never copied whole."""
  def layer(p, x, prevent_cse, query_len=None):
    def run(p, x):
      return DecoderLayer(cfg, mask, query_len, parent=None).apply({"params": p}, x, positions_bt, segment_ids_bt,
                                                                   None, None, None)[0]
    if cfg.remat_policy != "none":  # the same policy nn.remat applies to the module
      run = jax.checkpoint(run, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=prevent_cse)
    return run(p, x)

  def rolled(stacked, x):
    with jax.named_scope("layers"):
      # The last layer's unused rows are computed too: peeling it off the loop would copy the stacked params.
      return jax.lax.scan(lambda x, p: (layer(p, x, False), None), x, stacked)[0][:, :out_len]

  def unrolled(stacked, x):
    for i in range(cfg.num_layers):
      with jax.named_scope(f"layers_{i}"):  # unrolled, a CSE barrier keeps XLA from merging remat recomputation
        last = i == cfg.num_layers - 1
        x = layer(jax.tree.map(lambda a: a[i], stacked), x, True, out_len if last else None)
    return x

  return jax.lax.platform_dependent(stacked, x, cpu=unrolled, default=rolled)


class Transformer(nn.Module):
  """``apply({'params': p}, tokens, mask=..., positions=..., segment_ids=..., cache=...) -> ModelOutput``."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_bl, *, mask: masks_lib.Mask, positions=None, segment_ids=None,
               cache: Optional[KVCache] = None, logits_len: Optional[int] = None) -> ModelOutput:
    """``logits_len``: the output is the first ``logits_len`` positions only (BD3's clean half needs none): the
    logits, ``hidden`` ``[batch, logits_len, embed]``, and, where the layers are unrolled (a CPU compile, or
    ``scan_layers=False``), the last layer's queries, MLP and final norm; the other positions are keys and values."""
    cfg = self.config
    if tokens_bl.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got shape {tokens_bl.shape}.")
    if not isinstance(mask, masks_lib.Mask):
      raise TypeError(f"mask must be an ardiff.masks.Mask, got {type(mask).__name__}.")
    b, t = tokens_bl.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      if cache is not None:
        positions = positions + cache.lengths[:, None]
    if cache is not None and cache.k.shape[1] != b:
      raise ValueError(f"cache batch {cache.k.shape[1]} != tokens batch {b}.")
    if logits_len is not None and not (isinstance(logits_len, int) and 0 < logits_len <= t):
      raise ValueError(f"logits_len={logits_len!r} must be an int in 1..{t} (the tokens' length), or None for all.")
    if logits_len is not None and cache is not None:
      raise ValueError("logits_len is for uncached forwards (BD3's clean half); a cached forward returns every "
                       "position it is given.")
    out_len = t if logits_len is None else logits_len

    embed = nn.Embed(cfg.vocab_size, cfg.embed_dim, name="embed_tokens", dtype=cfg.compute_dtype,
                     param_dtype=cfg.weight_dtype,
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                                 ("vocab", "embed")))
    # Gather in the table's dtype, then cast (the same values as casting first): the backward scatter-add then
    # accumulates in the weights' dtype. A bf16 scatter-add into a small vocabulary serialises on atomics on GPU
    # (a 10x slower BD3 train step on an H200) and rounds every partial sum.
    if not jnp.issubdtype(tokens_bl.dtype, jnp.integer):
      raise ValueError(f"tokens must be integers, got dtype {tokens_bl.dtype}.")
    x = jnp.take(embed.embedding, tokens_bl, axis=0).astype(cfg.compute_dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    layer_cls = DecoderLayer
    if cfg.remat_policy != "none":
      layer_cls = nn.remat(DecoderLayer, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
    cache_k = cache.k if cache is not None else None
    cache_v = cache.v if cache is not None else None
    lengths = cache.lengths if cache is not None else None
    if cfg.scan_layers and cache is None and not self.is_initializing():
      x = _layer_stack(cfg, mask, _stacked_layer_params(self.variables), x, positions, segment_ids, out_len)
    elif cfg.scan_layers:
      cache_axis = 0 if cache is not None else nn.broadcast
      stack = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast, cache_axis, cache_axis, nn.broadcast),
                      length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x, new_kv = stack(cfg, mask, name="layers")(x, positions, segment_ids, cache_k, cache_v, lengths)
      x = x[:, :out_len]  # init (an uncached forward at init) and cached forwards (out_len = t)
    else:
      new_k, new_v = [], []
      for i in range(cfg.num_layers):
        layer_cache = (cache_k[i], cache_v[i]) if cache is not None else (None, None)
        query_len = out_len if i == cfg.num_layers - 1 and out_len != t else None
        x, kv = layer_cls(cfg, mask, query_len, name=f"layers_{i}")(x, positions, segment_ids, *layer_cache,
                                                                     lengths)
        if kv is not None:
          new_k.append(kv[0])
          new_v.append(kv[1])
      new_kv = (jnp.stack(new_k), jnp.stack(new_v)) if cache is not None else None

    hidden = RMSNorm(cfg, name="norm")(x)
    if cfg.tie_embeddings:
      logits = embed.attend(hidden)
    else:
      logits = Projection(cfg, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), "btd,dv->btv",
                          name="lm_head")(hidden)
    logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    new_cache = None
    if cache is not None:
      new_cache = cache.replace(k=new_kv[0], v=new_kv[1])
    return ModelOutput(logits=logits, hidden=hidden, cache=new_cache)


def abstract_params(config: ModelConfig):
  """``ShapeDtypeStruct`` tree of the parameters (no FLOPs, no mesh): what checkpoints and exports must match."""
  boxed = jax.eval_shape(lambda r: Transformer(config).init(r, jnp.zeros((1, 8), jnp.int32),
                                                            mask=masks_lib.Causal())["params"], jax.random.key(0))
  # Unbox without the sharding constraint that nn.meta.unbox would apply (there is no mesh here).
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, boxed, is_leaf=is_box)


def init_params(config: ModelConfig, rng: jax.Array, *, batch: int = 1, length: int = 8):
  """Unboxed parameters (plain arrays), for tests and single-device use; sharded init lives in ardiff.sharding."""
  model = Transformer(config)
  variables = model.init(rng, jnp.zeros((batch, length), jnp.int32), mask=masks_lib.Causal())
  return nn.meta.unbox(variables["params"])

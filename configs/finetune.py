"""Fine-tune an AR model into a block-diffusion model with one of the recipes of ardiff/objectives/recipes.py:
fastdllm_v2 (default; token shift, complementary masks, unweighted CE), sdar (1/p_mask weights) or bd3 (NELBO).
A low peak learning rate (1e-3), a short warmup and 300 steps.

Arguments (`configs/finetune.py:KEY=VALUE,...`):
  recipe=fastdllm_v2|sdar|bd3   the objective recipe (default fastdllm_v2)
  block_size=B                  the block size (default 4)
  from=DIR                      a run directory written by `ardiff convert` (model, tokenizer, [MASK] id, block size
                                and recipe come from it; recipe= / block_size= given here replace its values).
                                Without it: the model of configs/ar_shakespeare.py, initialised from
                                runs/ar_shakespeare.

Launch (after training configs/ar_shakespeare.py):
  python -m ardiff train --config configs/finetune.py                              # Fast-dLLM v2, B = 4
  python -m ardiff train --config configs/finetune.py:recipe=sdar,block_size=8
Or convert first (AR on Shakespeare -> HF export -> block diffusion, B = 4):
  python -m ardiff export --run_dir runs/ar_shakespeare --to hf --out exports/ar_shakespeare_hf
  python -m ardiff convert --from-hf exports/ar_shakespeare_hf --to block_diffusion --block-size 4 \
      --out runs/ar_shakespeare_bd4
  python -m ardiff train --config configs/finetune.py:from=runs/ar_shakespeare_bd4    # -> runs/ar_shakespeare_bd4_ft
(or convert the run directly: `python -m ardiff convert --from-run runs/ar_shakespeare --block-size 4 --out ...`).
Override the output with --config.train.run_dir=...
"""

import os

import ml_collections

from ardiff.experiment import base_config, parse_config_args
from ardiff.objectives.recipes import DEFAULT_RECIPE, RECIPES, recipe_fields

FILE = "configs/finetune.py"
ARGS = {"recipe": None, "block_size": None, "from": None}  # None: the converted run's value, else the default
DEFAULT_BLOCK_SIZE = 4
AR_RUN = "runs/ar_shakespeare"


def _read_run_config(run_dir: str) -> ml_collections.ConfigDict:
  """The experiment config of a converted run directory (a local path or a URL such as ``gs://bucket/run``)."""
  from ardiff.checkpoints import run_dir as run_dir_lib  # the run-dir format's one reader
  try:
    c, _ = run_dir_lib.read_config(run_dir)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e} Pass the directory written by `python -m ardiff convert ... --out DIR` as "
                            f"{FILE}:from=DIR.") from None
  if c.objective.kind != "block_diffusion":
    raise ValueError(f"{run_dir}/config.json has objective.kind={c.objective.kind!r}; convert the run first with "
                     "`python -m ardiff convert ... --to block_diffusion`.")
  return c


def get_config(arg=None):
  args = parse_config_args(arg, ARGS, FILE)
  recipe, block_size, converted = args["recipe"], args["block_size"], args["from"]
  if recipe is not None and recipe not in RECIPES:
    raise ValueError(f"--config {FILE}:{arg}: recipe={recipe!r} is not a recipe; use one of "
                     f"{', '.join(sorted(RECIPES))}.")
  if block_size is not None:
    try:
      block_size = int(block_size)
    except ValueError:
      raise ValueError(f"--config {FILE}:{arg}: block_size={block_size!r} is not an integer.") from None
  if converted:
    c = _read_run_config(converted)
    c.train.init_from = converted
    c.train.run_dir = converted.rstrip("/") + "_ft"
    name = os.path.basename(converted.rstrip("/")) + "_ft"
  else:
    c = base_config()  # the model of configs/ar_shakespeare.py, with the byte tokenizer's [MASK] = 258
    recipe = recipe or DEFAULT_RECIPE
    block_size = block_size or DEFAULT_BLOCK_SIZE
    c.train.init_from = AR_RUN
    name = f"{recipe}_finetune_b{block_size}"
    c.train.run_dir = f"runs/{name}"
  if recipe is not None:
    c.objective.update(recipe_fields(recipe))
  if block_size is not None:
    c.objective.block_size = block_size
  c.objective.kind = "block_diffusion"
  c.name = name
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 10
  c.train.num_steps = 300
  c.train.resume = True
  return c

"""Training core: optimizer, train state/step, checkpointing."""

from ardiff.checkpoints.checkpointer import Checkpointer  # noqa: F401
from ardiff.training.optimizer import OptimizerConfig, make_lr_schedule, make_optimizer  # noqa: F401
from ardiff.training.train_state import (NonFiniteError, TrainState, jit_train_step,  # noqa: F401
                                         make_train_step, raise_if_nonfinite, state_shardings)

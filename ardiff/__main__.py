"""``python -m ardiff <command>``: a thin CLI over importable library functions (Colab users call the same ones).

Commands are looked up in :mod:`ardiff.cli`; each one is a function taking ``argv``.
"""

import sys


def main(argv=None) -> int:
  from ardiff import cli  # deferred: `python -m ardiff --help` should not pay for importing jax twice
  return cli.main(sys.argv if argv is None else argv)


if __name__ == "__main__":
  sys.exit(main())

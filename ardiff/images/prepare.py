"""``python -m ardiff images prepare``: write an image dataset as a TFDS array_record dataset, offline, no TensorFlow.

    python -m ardiff images prepare --dataset fashion_mnist --data_dir ~/tensorflow_datasets
    python -m ardiff train --config configs/fashion_acdit.py --config.image.source=tfds \\
        --config.image.data_dir=~/tensorflow_datasets

Fashion-MNIST comes from the IDX files of Debian's ``dataset-fashion-mnist`` (``--idx_dir``, each file checked
against its sha256) and lands in ``<data_dir>/fashion_mnist/1.0.0`` (60k train, 10k test, ``image`` uint8 [28, 28],
``label`` 0..9). Other TFDS image datasets (``mnist``, ``kmnist``, ``cifar10``) are read as ``tfds build`` prepares
them (``--file_format=array_record``); see :mod:`ardiff.images.tfds_data`.
"""

from __future__ import annotations

import argparse
import time


USAGE = """usage: {prog} prepare [--dataset fashion_mnist] [--data_dir DIR] [--idx_dir DIR] [--overwrite]

  prepare    write Fashion-MNIST (the Debian package's IDX files) as a TFDS array_record dataset under --data_dir,
             offline and without TensorFlow; image configs read it with --config.image.source=tfds
             --config.image.data_dir=DIR"""


def main(argv) -> int:
  prog, args = (argv[0] if argv else "ardiff images"), list(argv[1:])
  if not args or args[0] in ("-h", "--help", "help"):
    print(USAGE.format(prog=prog))
    return 0
  if args[0] != "prepare":
    raise ValueError(f"unknown subcommand {args[0]!r} of `{prog}`; use prepare.")
  return _prepare(f"{prog} prepare", args[1:])


def _prepare(prog: str, argv) -> int:
  from ardiff.images import data as data_lib
  from ardiff.images import tfds_data

  p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", default=tfds_data.FASHION_NAME, choices=(tfds_data.FASHION_NAME,),
                 help="the dataset to write (default fashion_mnist)")
  p.add_argument("--data_dir", default="", help="TFDS data dir to write into (default $TFDS_DATA_DIR or "
                 f"{data_lib.TFDS_DEFAULT_DIR})")
  p.add_argument("--idx_dir", default="", help=f"the IDX files (default {data_lib.FASHION_DIR})")
  p.add_argument("--overwrite", action="store_true", help="replace a dataset already prepared there")
  a = p.parse_args(argv)
  start = time.perf_counter()
  out = tfds_data.prepare_fashion_mnist(data_lib.tfds_dir(a.data_dir), idx_dir=a.idx_dir, overwrite=a.overwrite)
  print(f"Prepared {out} in {time.perf_counter() - start:.1f}s  (--config.image.source=tfds "
        f"--config.image.data_dir={data_lib.tfds_dir(a.data_dir)})")
  return 0

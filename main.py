"""uvit_jax entry point: one program for every job.

  python main.py --config configs/fashion_mnist_uvit.py --workdir workdirs/fmnist
  python main.py --config configs/imagenet256_uvit_huge.py --mode convert \
      --config.convert.source=imagenet256_uvit_huge.pth --workdir workdirs/h256

Config fields are overridden with --config.a.b=value; unknown fields are rejected.

An expected error (a config field, a checkpoint, a dataset, a weights file, a locked workdir:
`uvit_jax.errors.EXPECTED`) ends the program with its message alone and exit status 2; the
traceback is shown with --verbose or UVIT_DEBUG=1.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow is only clu's event writer

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from uvit_jax import jobs  # noqa: E402
from uvit_jax.errors import EXPECTED  # noqa: E402
from uvit_jax.library_logs import QuietLibraries  # noqa: E402
from uvit_jax.parallel.xla_flags import add_cpu_flags  # noqa: E402

add_cpu_flags()  # before the first device use

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:arg]).")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and results.")
flags.DEFINE_enum("mode", "train", sorted(jobs.MODES), "What to do.")
flags.DEFINE_bool("verbose", False, "Show the traceback of expected errors too.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(QuietLibraries())  # their INFO chatter
    try:
        jobs.run(FLAGS.mode, FLAGS.config, FLAGS.workdir)
    except EXPECTED as e:
        if FLAGS.verbose or os.environ.get("UVIT_DEBUG") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)

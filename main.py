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
from uvit_jax.errors import EXPECTED, ConfigError  # noqa: E402
from uvit_jax.library_logs import QuietLibraries  # noqa: E402
from uvit_jax.parallel.xla_flags import add_cpu_flags  # noqa: E402

add_cpu_flags()  # before the first device use

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:arg]).")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and results.")
flags.DEFINE_enum("mode", "train", sorted(jobs.MODES), "What to do.")
flags.DEFINE_bool("verbose", False, "Show the traceback of expected errors too.")
flags.mark_flags_as_required(["config", "workdir"])


def _one_line(e: BaseException) -> str:
    if isinstance(e, KeyError):  # an override of a field the config does not have
        return "no such field " + " ".join(str(e.args[0]).split())
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with the config's own failures (a missing file, a file that raises
    or does not parse, an override of a field it does not have) as one line and exit status 2."""
    try:
        return FLAGS(argv)
    except flags.Error:
        return app.parse_flags_with_usage(argv)  # absl's message and usage
    except Exception as e:
        if "--verbose" in argv or os.environ.get("UVIT_DEBUG") == "1":
            raise
        print(f"error: --config: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)


def _config():
    """FLAGS.config; a config file that failed to load raises on first use: one line."""
    try:
        config = FLAGS.config
        config.keys()
    except Exception as e:
        raise ConfigError(f"--config: {_one_line(e)}") from e
    return config


def _check_workdir(workdir: str) -> None:
    """A local workdir that cannot be a folder (under a file, unwritable) is named at once."""
    if "://" in workdir:
        return
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--workdir={workdir}: cannot be a folder ({e.strerror})") from e


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(QuietLibraries())  # their INFO chatter
    try:
        config = _config()
        _check_workdir(FLAGS.workdir)
        jobs.run(FLAGS.mode, config, FLAGS.workdir)
    except EXPECTED as e:
        if FLAGS.verbose or os.environ.get("UVIT_DEBUG") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)

"""One error-handling and verbosity wrapper for every program (train.py, sample.py, evaluate.py, the converter).

User errors print one message on stderr and no traceback:

  exit 2  usage errors: `UsageError`, any `ValueError` (the library's checks
          raise it with a message that says what to change), absl flag errors,
          unknown config keys, missing or misnamed input paths;
  exit 1  failures: `RunError`, I/O failures (`OSError`: a read-only workdir,
          a full disk, an unreadable image), non-finite losses;
  exit 130  Ctrl-C outside the training loop (the loop itself checkpoints).

Anything else is a bug and keeps its traceback.  `--verbosity=1` (absl's
flag; the converter takes it too) shows tracebacks for user errors as well,
and the INFO logs of absl / orbax / grain / JAX, which are hidden by default
(warnings too: `--verbosity=0` shows them).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from collections.abc import Callable

USAGE = 2
FAILURE = 1
INTERRUPTED = 130


class UsageError(ValueError):
    """A setting or input the user must change (exit status 2)."""


class RunError(RuntimeError):
    """The program could not do its job with valid settings (exit status 1)."""


def exit_status(exc: BaseException) -> int | None:
    """2 for usage errors, 1 for failures, 130 for Ctrl-C, None for bugs (keep the traceback)."""
    from absl import app, flags

    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(exc, (UsageError, app.UsageError, flags.Error, FileNotFoundError, NotADirectoryError,
                        IsADirectoryError, FileExistsError)):
        return USAGE
    if isinstance(exc, (RunError, OSError, FloatingPointError)):
        return FAILURE
    if isinstance(exc, ValueError):
        return USAGE
    return None


def message(exc: BaseException) -> str:
    """The text users see: the exception's own message (its type only when it has none)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}"
    elif isinstance(exc, FileNotFoundError) and " " not in text:  # FileNotFoundError(path)
        text = f"no such file or directory: {text}"
    return text or type(exc).__name__


def set_verbosity(verbosity: int | None) -> None:
    """Library logging: ERROR by default (None), WARNING for <= 0, INFO for 1, DEBUG for >= 2."""
    if verbosity is None:
        level = logging.ERROR
    else:
        level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.getLogger().setLevel(level)
    for name in ("absl", "jax", "orbax", "grain", "tensorflow_datasets"):
        logging.getLogger(name).setLevel(level)
    if verbosity is None:
        import warnings

        warnings.simplefilter("ignore")  # Library deprecation chatter; --verbosity=0 shows it.


def handle(fn: Callable[[], object], *, prog: str, verbose: bool) -> int:
    """Run `fn()`; returns 0, or prints one line for a user error and returns its exit status.

    Bugs (exceptions that are neither usage errors nor failures) propagate with
    their traceback; with `verbose` user errors print their traceback too.
    """
    try:
        fn()
        return 0
    except BaseException as e:  # noqa: BLE001 - classified below; bugs re-raised
        if isinstance(e, SystemExit):
            raise
        status = exit_status(e)
        if status is None:
            raise
        if verbose:
            traceback.print_exc()
        sys.stdout.flush()
        print(f"{prog}: error: {message(e)}", file=sys.stderr, flush=True)
        return status


def _prog() -> str:
    return os.path.basename(sys.argv[0]) or "diffusion_jax"


def _unknown_key_message(exc: BaseException, argv: list[str]) -> str:
    """ml_collections raises a bare KeyError/AttributeError("'foo'") for an unknown override."""
    key = str(exc).strip("\"' ")
    named = [a.split("=")[0] for a in argv[1:] if a.startswith("--") and re.search(rf"\.{re.escape(key)}(=|$)", a)]
    where = f" in {named[0]}" if named else ""
    return (f"unknown config field {key!r}{where}; the config file lists every field "
            "(overrides must name an existing one, e.g. --config.train.batch_size=64)")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors (exit 2) instead of absl's FATAL text or a traceback."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"{_prog()}: error: {e} (--helpshort lists the flags)", file=sys.stderr)
    except (KeyError, AttributeError) as e:  # ml_collections: an override of a field that does not exist
        print(f"{_prog()}: error: {_unknown_key_message(e, argv)}", file=sys.stderr)
    except (TypeError, ValueError, OSError) as e:  # ml_collections: a bad override value or config file
        print(f"{_prog()}: error: {str(e).strip() or type(e).__name__}", file=sys.stderr)
    sys.exit(USAGE)


def load_config_flag(name: str = "config"):
    """The config of an ml_collections config flag; a missing or broken file is a `UsageError`.

    ml_collections defers a config file's load error until first use; this
    surfaces it at start-up with the file name, before anything is compiled.
    """
    from absl import flags

    try:
        config = getattr(flags.FLAGS, name)
        config.keys()
    except (OSError, SyntaxError, ImportError, AttributeError) as e:
        path = getattr(flags.FLAGS[name], "config_filename", None) or ""
        cause = e.__cause__ or e
        detail = "no such file" if not os.path.exists(path.split(":")[0]) else \
            f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
        raise UsageError(f"--{name}={path}: cannot load the config file ({detail})") from e
    return config


def run_main(main: Callable[[list[str]], object]) -> None:
    """`absl.app.run(main)` with one-line user errors, the exit statuses above and quiet libraries."""
    from absl import app, flags

    def wrapped(argv):
        verbosity = flags.FLAGS.verbosity if flags.FLAGS["verbosity"].present else None
        set_verbosity(verbosity)
        status = handle(lambda: main(argv), prog=_prog(), verbose=(verbosity or 0) >= 1)
        sys.exit(status)

    app.run(wrapped, flags_parser=parse_flags)


def run_plain(main: Callable[[list[str] | None], object], argv: list[str] | None = None, *,
              prog: str = "python -m diffusion_jax.convert") -> None:
    """The same for argparse programs (the converter): `--verbosity=N` is read before `main` parses."""
    args = sys.argv[1:] if argv is None else argv
    verbosity = None
    for i, a in enumerate(args):
        value = a.split("=", 1)[1] if a.startswith("--verbosity=") else \
            args[i + 1] if a == "--verbosity" and i + 1 < len(args) else None
        if value is not None and value.lstrip("-").isdigit():
            verbosity = int(value)
    set_verbosity(verbosity)
    sys.exit(handle(lambda: main(argv), prog=prog, verbose=(verbosity or 0) >= 1))

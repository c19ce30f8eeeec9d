"""The `histotransfer` command line's entry point: ``main`` runs one command (cli.commands, parsed by
cli.parser) and maps every way it can end onto the exit-status contract.

Exit status, decided in ``main`` only (the table in docs/command-line.md, "Exit status"):
  0    success
  1    some slides failed, the rest finished (their summary.csv says why); for `run`, also a stage
       that failed for one encoder while the others finished; for `verify`, an artifact that no
       longer matches what it was made from
  2    unusable input or usage: one line naming the file, row, key or folder, and the fix
  70   internal error (a bug): one line, and the traceback in a log file whose path is printed
  130  interrupted (Ctrl-C): what finished is kept, and a rerun resumes from it
  141  the reader of the output went away (`| head`): quietly, as a process killed by SIGPIPE
  143  terminated (SIGTERM: docker stop, Kubernetes): as 130
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import tempfile
import traceback
from pathlib import Path

from histotransfer import __version__
from histotransfer.cli import printing
from histotransfer.core.errors import USER_ERRORS
from histotransfer.core.logs import configure_logging
from histotransfer.io.assets import cache_dir
from histotransfer.io.lifecycle import command_scope

EXIT_OK, EXIT_SLIDES_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 70, 130
EXIT_TERMINATED, EXIT_BROKEN_PIPE = 143, 141

# The modules of the install extras (pyproject.toml): the core installs predict only (the slim image).
EXTRAS = {
    **dict.fromkeys(
        ("torch", "torchvision", "timm", "sklearn", "imagecodecs", "onnx", "onnxscript"), "study"
    ),
    **dict.fromkeys(("kfp", "docker"), "pipelines"),
}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The message for a command that needs an install extra this installation lacks, else None."""
    extra = EXTRAS.get((exc.name or "").split(".")[0])
    if extra is None:
        return None
    return (
        f"this command needs {exc.name} (the {extra!r} extra), which this installation lacks (the core "
        f"install, or the predict image, serves predict only): pip install 'histotransfer[{extra}]', or "
        "use the full image"
    )


def crash_log(argv: list[str]) -> Path:
    """Write the current exception's traceback to a new log file (in the cache's logs/ folder, else
    the temporary folder) and return its path."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = f"histotransfer {__version__}\nargv: {argv}\n\n{traceback.format_exc()}"
    for folder in (cache_dir() / "logs", Path(tempfile.gettempdir())):
        path = folder / f"histotransfer-crash-{stamp}-{os.getpid()}.log"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    raise OSError("no folder to write the crash log to")


def main(argv: list[str] | None = None) -> int:
    """Run one command and map every way it can end onto the exit-status contract (module docstring)."""
    from histotransfer.cli.commands import run_command  # they read this module's exit statuses
    from histotransfer.cli.parser import build_parser

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pipeline"]:  # its own parser (and -h) lives in pipelines/cli.py
        argv = ["pipeline", "--", *argv[1:]]
    try:
        args = build_parser().parse_args(argv)  # usage errors exit 2 here, with argparse's message
        configure_logging(args.verbose)
        with command_scope():
            return run_command(args)
    except KeyboardInterrupt as exc:
        terminated = getattr(exc, "signal", "SIGINT") == "SIGTERM"
        printing.interrupted(exc, terminated=terminated)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except USER_ERRORS as exc:
        printing.error(str(exc))
        return EXIT_BAD_INPUT
    except ModuleNotFoundError as exc:  # a command of the study run where only predict is installed
        if (message := missing_extra(exc)) is None:
            return _internal_error(argv, exc)
        printing.error(message)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # the reader of the output went away (`histotransfer encoders | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_BROKEN_PIPE
    except OSError as exc:  # a file or folder the user named cannot be read or written
        name = f"{exc.filename}: " if exc.filename else ""
        printing.error(f"{name}{exc.strerror or exc}")
        return EXIT_BAD_INPUT
    except Exception as exc:
        return _internal_error(argv, exc)


def _internal_error(argv: list[str], exc: Exception) -> int:
    try:
        where = f"the traceback is in {crash_log(argv)}"
    except OSError:
        where = "no log file could be written; rerun with -v"
    printing.internal_error(exc, where)
    return EXIT_INTERNAL

"""The `histotransfer` command line: ``main`` and its exit statuses (entry), the parser (parser) with
the flags made from the config schema (flags), the commands (commands) and what they print (printing).
"""

from histotransfer.cli.entry import (
    EXIT_BAD_INPUT,
    EXIT_BROKEN_PIPE,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SLIDES_FAILED,
    EXIT_TERMINATED,
    main,
    missing_extra,
)

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_BROKEN_PIPE",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_SLIDES_FAILED",
    "EXIT_TERMINATED",
    "main",
    "missing_extra",
]

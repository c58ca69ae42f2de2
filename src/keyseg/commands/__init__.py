"""One module per ``keyseg`` subcommand.

Each module defines ``HELP`` (one line), ``EXAMPLE`` (one example command line),
``add_arguments(parser)`` and ``run(args) -> int``. Heavy imports (torch, transformers)
happen inside ``run`` so that ``keyseg --help`` stays instant.
"""

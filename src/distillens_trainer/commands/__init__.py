"""The commands behind ``distillens``: one module per command (``train``, ``eval``, ``demo``, ``shrink``, ``lens``),
each with a ``main(argv) -> exit code``; :mod:`.parsing` reads their command lines and :mod:`.process` starts
and ends a launched process. Nothing in the library imports this package; ``distillens_trainer.cli`` dispatches
to it."""

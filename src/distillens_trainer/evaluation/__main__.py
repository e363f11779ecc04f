"""``python -m distillens_trainer.evaluation ARGS`` runs ``distillens eval ARGS``."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))

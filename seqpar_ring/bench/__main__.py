"""Entry point: ``python -m seqpar_ring.bench <ring|dilated|e2e|packed> [options]``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"ring": "ring", "dilated": "dilated", "e2e": "e2e", "packed": "packed"}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__ + "\n\n" + importlib.import_module(__package__).__doc__)
        raise SystemExit(2)
    module = importlib.import_module(f"{__package__}.{COMMANDS[sys.argv[1]]}")
    module.main(sys.argv[2:])


if __name__ == "__main__":
    main()

"""The one exception type that minibert raises for bad input, and how scripts report it.

Library code raises MinibertError with a message that names the file and the problem; only
the entry points (train.py, convert_weights.py, `python -m minibert.fill_mask`) turn it into
a one-line error and a non-zero exit status.
"""

from __future__ import annotations

import sys
from typing import Callable


class MinibertError(Exception):
    """Bad input that the user can fix: a missing file, a corrupt checkpoint, an empty corpus."""


def run_main(main: Callable[[], int | None]) -> None:
    """Call main(); report a MinibertError as 'error: <message>' and exit with status 1."""
    try:
        status = main()
    except MinibertError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)

"""Library defaults that the CLI shows in ``--help``, in one place and free of NumPy.

``metrics.py`` re-exports them; ``cli.py`` reads them from here, so ``klseg --help`` does not
import NumPy and an option's default cannot drift from the library's (DESIGN §2: eps 1e-7).
"""

DEFAULT_EPS = 1e-7
"""p̃ = max(p, eps) before log p, whatever the map's dtype."""

DEFAULT_MAX_PIXELS = 1 << 31  # per 2-D image plane: refuse absurd headers before allocating

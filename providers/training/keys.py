"""Unknown-key checks live in providers/keys.py (below the training core and the graders); this name stays for
the modules that import it from here."""

from ..keys import (  # noqa: F401 - re-exported
    UNKNOWN_KEY,
    KnownKeys,
    accepted_keys,
    check_keys,
    error_loc,
    first_unknown_key,
    keys_checker,
    nearest,
    unknown_key_message,
)

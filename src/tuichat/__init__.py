"""tuichat: a terminal chat client and local server manager for LMDeploy."""

import sys

__version__ = "0.1.0"

# httpx imports its own command-line tool whenever click is installed (huggingface_hub brings it), and with it
# click, pygments and rich's progress and syntax modules: ~30 ms of every tuichat's first request, for a tool tuichat
# never runs. A None entry makes that one import fail the way httpx expects when click is missing.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]  # None is how Python spells "not importable"

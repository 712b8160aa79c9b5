"""Optional teacher backends besides the Hugging Face reference (``kdcache.teacher``).

``kdcache.backends.vllm``: teacher records from vLLM's prompt log-probs (``pip install
'kdcache[vllm]'``). Nothing here imports vLLM at import time: the package and its tests work
without it.
"""

from ..config import BACKENDS  # noqa: F401  (hf | vllm: the one list, with the configs)


class BackendUnavailable(RuntimeError):
    """An optional backend's dependency is missing; the message says what to install."""

"""`import transformers` without the scikit-learn import it makes on the way.

transformers 5.x imports `sklearn.metrics` (and with it most of scikit-learn and SciPy) as soon as a config, a
tokenizer or a model class loads (`transformers.generation.candidate_generator`), for one feature: the confidence
threshold of assisted (speculative) generation, which nothing here uses. scikit-learn is installed only as MLflow's
dependency. The import costs ~1.3 CPU-seconds per process (`import transformers` + a tokenizer and a model class:
4.9-5.3 CPU-s with it, 3.6-3.9 without, here), and every serving replica, Ray Train worker and CLI command that reads a
tokenizer pays it. So the processes that load transformers through `load()` report scikit-learn as unavailable to
transformers (its own switch, `is_sklearn_available`), before anything imports the generation module.

Limits: only where `load()` runs first in the process (a process that imported transformers already keeps what it
has); an assisted-generation call would run without its dynamic threshold (none is made here).
"""

from __future__ import annotations

import sys
from types import ModuleType

_GENERATION = "transformers.generation.candidate_generator"  # the module that imports sklearn


def _sklearn_unavailable() -> bool:
    return False


def load() -> ModuleType:
    """The `transformers` module; the first call in a process, before its generation module loads, leaves
    scikit-learn unimported."""
    if _GENERATION not in sys.modules:
        import transformers.utils
        import transformers.utils.import_utils

        # `transformers.utils` re-exports the function, and the generation module imports it from there by name
        transformers.utils.is_sklearn_available = _sklearn_unavailable
        transformers.utils.import_utils.is_sklearn_available = _sklearn_unavailable
    import transformers

    return transformers

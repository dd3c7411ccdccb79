"""tomtransfer: transfer a teacher LLM's strategic choices to a small student, and measure the transfer.

One import namespace for the product (`pip install` puts a single top-level package into site-packages):

- `tomtransfer.shared` - the domain core (folder `shared/`): config, scenarios, prompts, parsing, samples, metrics,
  the transfer measurement. Pure Python: no Ray, no HTTP.
- `tomtransfer.services` - the services (folder `services/`): teacher (the Ray Serve app and its engines),
  collector (generate), trainer (Ray Train, LoRA), evaluator, common (fingerprints, checks, models); and
  `tomtransfer.services.pipeline`, the stages that run them; `tomtransfer.services.cli`, the `tomtransfer` command.

The card's folders stay where they are: pyproject's package-dir mapping installs `shared/` as `tomtransfer/shared`
and `services/` as `tomtransfer/services` (`pip install -e .` maps them the same way).
"""
from pathlib import Path as _Path

__version__ = "0.1.0"

# A source checkout used without installing it (PYTHONPATH=<checkout>, as the GPU device's runs do): there the
# card's folders sit beside this package instead of inside it, so its search path takes the checkout in. An
# installed package (wheel or editable) never needs this.
_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).resolve().parent / "shared").is_dir() and (_checkout / "pyproject.toml").is_file() \
        and (_checkout / "shared" / "__init__.py").is_file() and (_checkout / "services" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 - the package's own search path

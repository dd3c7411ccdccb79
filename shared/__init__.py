"""tomtransfer's domain core: scenarios, prompts, parsing, samples, metrics and the transfer measurement, config.

Pure Python (no Ray, no HTTP, no model weights): everything here is data and functions, so the services, the CLI and
the tests share one definition of a scenario, a prompt, a sample and a metric. The public surface is below; the
modules hold the rest (importable, but not promised)."""

from tomtransfer._exports import lazy

_PUBLIC = {
    "ExperimentConfig": "config",
    "ConfigError": "config",
    "parse_config": "config",
    "load_config": "config",
    "UserError": "errors",
    "Context": "catalog",
    "Scenario": "catalog",
    "Catalog": "catalog",
    "build_catalog": "scenarios",
    "default_catalog": "scenarios",
    "Game": "games",
    "PublicGoodsGame": "games",
    "analyze": "games",
    "build_messages": "prompts",
    "parse_choice": "parsing",
    "parse_contribution": "parsing",
    "read_samples": "samples",
    "adapter_name": "samples",
    "served_model": "samples",
    "check_unique": "samples",
    "Counts": "metrics",
    "improvement": "metrics",
    "js_divergence": "metrics",
    "Choice": "transfer",
    "Estimate": "transfer",
    "GroupTransfer": "transfer",
    "analyze_group": "transfer",
    "mean_transfer": "transfer",
    "verdict": "transfer",
    "SweepSpec": "sweep",
    "Cell": "sweep",
    "load_sweep": "sweep",
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy(__name__, _PUBLIC)

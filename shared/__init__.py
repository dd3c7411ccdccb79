"""tomtransfer's domain core: scenarios, prompts, parsing, metrics and statistics, config.

Pure Python (no Ray, no HTTP, no model weights): everything here is data and functions, so the
services, the CLI and the tests share one definition of a scenario, a prompt and a metric.
"""

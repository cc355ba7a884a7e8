"""rgeom: measure how safety fine-tuning reorganizes a language model's refusal geometry."""

__version__ = "0.1.0"

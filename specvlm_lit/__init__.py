"""specvlm-lit: SpecVLM speculative drafters for vision-language models, trained with Lightning + Hydra."""

__version__ = "0.1.0"

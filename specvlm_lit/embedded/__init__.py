"""The embedded default target: a small LLaVA trained by the project on synthetic data."""

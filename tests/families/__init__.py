"""Tiny random-weight checkpoints of the real Hugging Face VLM classes, one per supported family (see build.py)."""

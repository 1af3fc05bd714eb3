"""Online-logit distillation of SpecVLM drafters (Lightning)."""

"""Closing the loop: curation, LoRA distillation, evaluation, registry, schedule, hot swap."""

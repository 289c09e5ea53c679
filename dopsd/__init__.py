"""dopsd: continual D-OPSD fine-tuning of few-step text-to-image models."""

"""Training: full training from scratch (``full``); LoRA fine-tuning comes later."""

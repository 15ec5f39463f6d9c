"""Model definitions (PyTorch modules) whose attribute names match the reference checkpoints."""

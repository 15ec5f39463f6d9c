"""Reading checkpoints: file formats, key layouts and config inference live here, in one place."""

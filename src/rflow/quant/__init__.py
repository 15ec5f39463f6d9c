"""Weight quantization: packed weight formats (int8/fp8 per row, GGUF's block formats) as pure
functions, and the modules that run layers from them."""

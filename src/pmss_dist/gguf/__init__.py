"""GGUF (llama.cpp's format) in and out: `to_hf` reads a GGUF file into a Hugging Face checkpoint
directory, `from_hf` writes one as llama.cpp's converter does. The trainer imports neither."""

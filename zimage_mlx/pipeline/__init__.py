"""The generation pipeline: the facade, the request, conditioning, guidance, the denoise loop."""

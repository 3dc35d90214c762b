"""LoRA: file formats, run-time branches, named adapters."""

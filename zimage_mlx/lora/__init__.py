"""LoRA: file formats (formats), patches parsed from a file (patches), run-time and trainable layers (layers),
named adapters of a pipeline (adapters)."""

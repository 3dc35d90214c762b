"""zimage_mlx: Alibaba Tongyi-MAI's Z-Image text-to-image models on Apple Silicon with MLX.

    from zimage_mlx import ZImagePipeline
    pipe = ZImagePipeline.from_pretrained("Tongyi-MAI/Z-Image-Turbo")
    pipe(prompt="a cat", seed=0).images[0].save("cat.png")
"""

__version__ = "0.1.0"

__all__ = ["ZImagePipeline", "PipelineOutput", "GenerationCancelled", "GenerationError", "GenerationRequest",
           "RequestError", "StepRecord", "WeightError", "LoRAError", "__version__"]


def __getattr__(name):
    # Lazy so that `import zimage_mlx` stays cheap and has no side effects.
    if name in ("ZImagePipeline", "PipelineOutput", "GenerationCancelled", "GenerationError"):
        from .pipeline import pipeline

        return getattr(pipeline, name)
    if name in ("GenerationRequest", "RequestError"):
        from .pipeline import request

        return getattr(request, name)
    if name == "StepRecord":
        from .pipeline.denoise import StepRecord

        return StepRecord
    if name == "WeightError":
        from .loading.weights import WeightError

        return WeightError
    if name == "LoRAError":
        from .lora.adapters import LoRAError

        return LoRAError
    raise AttributeError(f"module 'zimage_mlx' has no attribute {name!r}")

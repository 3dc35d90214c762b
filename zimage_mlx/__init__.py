"""zimage_mlx: Z-Image on MLX."""
__version__ = "0.1.0"

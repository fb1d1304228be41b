"""Hot loops: numba on CPU, cupy/torch on GPU, torch fallback."""

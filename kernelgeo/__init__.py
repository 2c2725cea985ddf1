"""kernelgeo: optimization on submanifolds of convolution kernels."""

__version__ = "0.1.0"

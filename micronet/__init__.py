"""micronet: train, compress, score (MicroNet Challenge rules) and export CIFAR-100 networks."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("micronet")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0"

__all__ = ["__version__"]

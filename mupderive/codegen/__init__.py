"""Generated PyTorch modules: ``generate(derivation)`` returns the source of a module applying a derivation."""

from mupderive.codegen.generate import generate

__all__ = ["generate"]

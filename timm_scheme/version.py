"""The package's version, in a module of its own: submodules read it without importing the package's ``__init__``."""
__version__ = "0.1.0"

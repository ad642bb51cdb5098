"""The `hubdeploy` command line: the composition root that wires the layers together."""
__version__ = "0.1.0"

"""meshlb: a layer-4 load balancer that runs on every application host."""

__version__ = "0.1.0"

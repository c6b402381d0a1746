"""rlhf_ray: distributed RLHF on Ray."""
__version__ = "0.1.0"

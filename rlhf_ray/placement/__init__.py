"""Placement: the cluster plan (resources and memory, one owner) and its Ray placement groups."""

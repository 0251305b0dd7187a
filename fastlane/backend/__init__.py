"""Backends: how a node forwards traffic for the subnets in the lease table."""

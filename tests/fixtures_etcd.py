"""Fixtures that start a real throwaway etcd (filled in by the etcd adapter work)."""

"""The bench's lab: namespace topologies and throwaway etcd servers.

They build the machines `fastlane bench` and the test suite run daemons on; the daemon
itself never needs them, so they live here rather than beside the daemon's modules.
"""

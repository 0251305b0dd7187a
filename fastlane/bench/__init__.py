"""`fastlane bench`: throughput and latency on a namespace topology."""

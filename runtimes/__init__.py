"""Running and benchmarking edgec artifacts on devices."""

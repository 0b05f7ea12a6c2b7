"""Load generator comparing routing strategies on realistic workloads."""

"""Arrival processes: seeded Poisson gaps at the rate, trace offsets, concurrency by default."""
from loadgen.arrivals import ConcurrencyArrivals, PoissonArrivals, TraceArrivals, make_arrivals
from loadgen.workloads import RequestSpec


def test_poisson_mean_gap_matches_rate_and_is_seeded():
    chains = [[RequestSpec(i, "completions", 1)] for i in range(4000)]
    t = PoissonArrivals(20.0, seed=1).start_times(chains)
    assert t == PoissonArrivals(20.0, seed=1).start_times(chains)
    assert t[0] == 0.0 and all(b >= a for a, b in zip(t, t[1:]))
    assert abs(t[-1] / (len(t) - 1) - 1 / 20.0) < 0.005


def test_make_arrivals_choices():
    assert isinstance(make_arrivals("rag", 0, 0, 0), ConcurrencyArrivals)
    assert isinstance(make_arrivals("rag", 5, 0, 0), PoissonArrivals)
    assert isinstance(make_arrivals("trace", 0, 0, 0), TraceArrivals)
    assert make_arrivals("trace", 0, 3, 0) == ConcurrencyArrivals(3)
    chains = [[RequestSpec(0, "completions", 1, arrival=2.5)]]
    assert TraceArrivals().start_times(chains) == [2.5]

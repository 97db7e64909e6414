"""The benchmark's own arithmetic (deploy/bench.py): percentiles and where the time went."""
from deploy import bench


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert bench.percentile(values, 50) == 50
    assert bench.percentile(values, 99) == 99
    assert bench.percentile([7], 99) == 7


def test_each_step_takes_the_difference_of_the_two_records_timestamps():
    # order -> timestamp (ms) on each topic of a wallet payment's way
    way = {"o1": [0, 10, 110, 120, 130, 150], "o2": [0, 20, 60, 70, 80, 90]}
    stamps = {topic: {o: ts[i] for o, ts in way.items()} for i, topic in enumerate(bench.STAGE_TOPICS)}
    stamps[bench.STAGE_TOPICS[3]]["o3"] = 5  # an order not seen everywhere is left out
    steps = bench.stage_latencies(stamps)
    assert [s["step"] for s in steps] == ["gateway", "risk engine", "gateway", "escrow", "gateway"]
    assert [(s["p50"], s["p99"]) for s in steps] == [(10, 20), (40, 100), (10, 10), (10, 10), (10, 20)]
    assert "risk engine 40/100" in bench.stages_line(steps)


def test_no_order_seen_everywhere_gives_no_steps():
    assert bench.stage_latencies({t: {} for t in bench.STAGE_TOPICS}) is None
    assert bench.stages_line(None) == "n/a"

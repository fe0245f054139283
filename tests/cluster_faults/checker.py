"""The total-queue checker (rabbitmq/jepsen's `total-queue` semantics, CLUSTER.md §3.4).

Input: per producer the set of attempted sequence numbers and the confirm time of
each confirmed one; every delivery seen by consumers and by the final drain, in
arrival order, as (time, (producer, seq), redelivered, who).

    lost        confirmed but never received                     (must be 0)
    unexpected  received but never published                    (must be 0)
    duplicates  receptions beyond the first of a message         (allowed, reported)
    recovered   published, outcome unknown (no confirm), received (allowed)
    order       deliveries, first-time (not redelivered) ones only, whose seq is below
                one the same consumer already received from the same producer (reported;
                competing consumers each see a subsequence of the queue, so the order
                is checked per consumer)
    failover    the longest stretch without any confirm, from the fault's injection
                to the end of the load (s)
"""

import collections


def check(producers, deliveries, t_fault, t_end):
    """producers: {pid: (attempted set, confirmed {seq: t})}."""
    received = collections.Counter(key for _, key, _, _ in deliveries)
    attempted = {(p, s) for p, (att, _) in producers.items() for s in att}
    confirmed = {(p, s) for p, (_, conf) in producers.items() for s in conf}
    lost = sorted(confirmed - set(received), key=str)
    unexpected = sorted((k for k in received if k not in attempted), key=str)
    dups = sum(c - 1 for c in received.values())
    recovered = len({k for k in received if k in attempted and k not in confirmed})
    unknown_missing = len(attempted - confirmed - set(received))

    order = 0
    high = {}
    for _, (p, s), redelivered, who in deliveries:
        if p == "?":
            continue
        k = (who, p)
        if not redelivered and k in high and s < high[k] and received[(p, s)] == 1:
            order += 1
        high[k] = max(high.get(k, s), s)

    times = sorted(t for _, (_, conf) in producers.items() for t in conf.values() if t_fault <= t <= t_end)
    failover = None
    failover_at = None
    if t_fault is not None:
        marks = [t_fault] + times + [t_end]
        # Where the longest stretch began, after the fault: at 0 it is the
        # fault itself; near the heal it is the healing (a restart, a rejoin).
        failover, start = max((b - a, a) for a, b in zip(marks, marks[1:]))
        failover_at = start - t_fault
    # Lost messages "from the middle": a lost seq below the producer's highest received seq.
    top = {}
    for p, s in received:
        if isinstance(s, int):
            top[p] = max(top.get(p, s), s)
    lost_middle = sum(1 for p, s in lost if top.get(p, -1) > s)
    return {
        "attempted": len(attempted),
        "confirmed": len(confirmed),
        "received": len(received),
        "lost": len(lost),
        "lost_sample": lost[:10],
        "lost_middle": lost_middle,
        "unexpected": len(unexpected),
        "unexpected_sample": unexpected[:10],
        "duplicates": dups,
        "recovered": recovered,
        "unknown_missing": unknown_missing,
        "order": order,
        "failover": failover,
        "failover_at": failover_at,
        "confirms_after_fault": len(times),
    }


def self_test():
    """The checker must find what it claims to find (run: python3 checker.py)."""
    prods = {0: ({0, 1, 2, 3, 4}, {0: 1.0, 1: 2.0, 2: 3.0, 3: 9.0}), 1: ({0, 1}, {0: 1.5})}
    dl = [(0, (0, 0), False, "c"), (0, (0, 2), False, "c"), (0, (0, 1), False, "c"),
          (0, (0, 2), True, "c"), (0, (1, 1), False, "c"), (0, (7, 7), False, "c"), (0, (0, 4), False, "c")]
    r = check(prods, dl, t_fault=2.5, t_end=10.0)
    assert r["lost"] == 2 and set(r["lost_sample"]) == {(0, 3), (1, 0)}, r
    assert r["lost_middle"] == 2, r  # (0,3) lost below received (0,4); (1,0) below (1,1) too
    assert r["unexpected"] == 1 and r["unexpected_sample"] == [(7, 7)], r
    assert r["duplicates"] == 1 and r["order"] == 1 and r["recovered"] == 2, r
    assert abs(r["failover"] - 6.0) < 1e-9, r  # 3.0 -> 9.0
    print("checker self-test ok")


if __name__ == "__main__":
    self_test()

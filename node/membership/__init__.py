"""Who is in the swarm: the SWIM machine, the member table, the transmit queue
and the update codec.

- swim.py: ``Membership``, the core (its docstring is the theory of operation)
- detector.py: the failure detector's probe rounds, relays and local health
- events.py: the events ``handle`` takes and the effects it returns
- config.py: ``MembershipConfig``
- table.py: ``MemberTable``, ``Member``, ``MemberState``, ``Roster``
- queue.py: ``TransmitLimitedQueue``, the news still to pass on
- codec.py: the updates on the wire, and ``SeenSet`` of broadcasts
- random_set.py: ``RandomSource`` (what the cores are handed) and ``RandomSet``
"""

# Every module of this package is a sans-IO core (tests/unit/test_import_graph.py).
SANS_IO = True

"""`make chaos`: fault injection against a real `chatops serve`, each scenario ending in an
invariant check and one summary line (docs/RELIABILITY.md has what each does and the results).

Scenarios (`python -m chaos --scenario NAME`, in this order by default):

- `kill9`: SIGKILL of the service while writers append to streams and sessions generate.
- `sigterm`: graceful drain under the same load.
- `redis`: the rate limiter's Redis killed, frozen and brought back.
- `faults`: every upstream fault the simulator injects, plus the upstream going away.
- `disconnects`: 1,000 clients hanging up at random points while generations run.
- `postgres`: the database restarted under load (last: the shared server blips for everyone).

Everything talks only to 127.0.0.1, every wait is bounded, and every process and database a
scenario starts is stopped or dropped when it ends.
"""

"""The svidgate process: lifecycle, listeners, HTTP endpoints, signals and the wiring of the services.

- `server`: the one owner of start, drain, stop and reload (`Server`, `serve`, `run`);
- `listeners`: the state-directory lock, TCP address probes, the owner of each unix socket file;
- `http`: ``/metrics``, ``/healthz``, ``/readyz`` (aiohttp);
- `drain`: ends long-lived gRPC streams with OK on stop;
- `signals`: SIGTERM/SIGINT/SIGHUP and the stop watchdog;
- `reload`: the configuration in force and how a reload replaces it;
- `wiring`: the composition root (which source, which services, what a reload swaps in them).

The runtime imports everything below it (sources, services, metrics); only `svidgate.cli` (and `demo`) import
the runtime, and nothing under `svidgate.identity`, `svidgate.sds`, `svidgate.extauthz` or
`svidgate.workloadapi` may.
"""

"""run: `kscan run` — the asyncio engine watching many VMs.

`engine` owns the tasks and implements `context.WatchContext` for the per-VM
`watcher`s; `scheduler` spends the CPU budget; `events` writes the JSON-lines stream;
`actions` pauses, runs hooks and keeps forensic copies; `metrics` serves Prometheus
metrics from snapshots taken on the loop, over `metrics_http` (a cached, paced page
whose CPU the scan budget does not pay); `service` speaks systemd's sd_notify.
"""

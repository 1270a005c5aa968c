"""The planner (``pmss-plan``): will a run fit on a cluster, and how fast will it go, answered on
one CPU by running the trainer's own build and step on fake devices.

- `shapes`: where a model's shape comes from (its config.json, or the published shapes kept here)
- `fake`: the fake world (torch's fake process group) and the fake-tensor build
- `probe`: one training step on fake devices, measured: memory per rank, collectives, FLOPs
- `comms`: collective bytes per step, within and between nodes
- `timing`: the time model (FLOPs, peak FLOP/s, bandwidths)
- `planner`: every (dp_shard, reshard, AC) setting and the cheapest that fits
- `report`: the plan as text and JSON
"""

"""The planner's room: what a plan will cost before it runs, and which plan to run.

    costs      the cost model (`OpCounter`: FLOPs and bytes per op) and hardware profiles (`Hardware`,
               the published ones in hardware/, calibrated ones in the cache folder)
    calibrate  `moedit calibrate`: measures this machine (or the shaped link) into a profile
    simulate   replays compiled rank programs on fake tensors and simulates a sample on a profile
    search     `moedit plan`: candidate plans, ranked by the simulator, lossy ones probed for quality

It reads compiled programs and the runtime's ops; nothing in the compiler core or the runtime
imports it (tests/test_layout.py).
"""

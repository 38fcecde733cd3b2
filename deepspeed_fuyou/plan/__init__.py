"""What a config means on this machine, decided once for training and estimate alike: whether it can run
(`preflight`), how the pinned budget and the optimizer's pipeline are sized (`sizing`), how ZeRO-3 lays the model
out in partitions and sub-groups (`zero_layout`), which swap files the DRAM tier holds (`host_tier`)."""

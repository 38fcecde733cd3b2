"""The ZeRO-3 swap path's runtime on the fuyou I/O engine and pinned pool: the swap runtime, the optimizer
swapper, the step thread and the registry of pending parameter updates. The DeepSpeed subclasses that use them (the
stage-3 optimizer, the parameter swapper) live in `integration`."""

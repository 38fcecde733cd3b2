"""The ZeRO-3 swap path: parameter and optimizer swappers on the fuyou I/O engine and pinned pool, and the stage-3
optimizer subclass that uses them."""

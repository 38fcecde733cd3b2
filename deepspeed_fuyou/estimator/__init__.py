"""`fuyou estimate`: what a config needs on every device before anything is allocated (`estimate`), how long its step
takes (`step_time`, from `rates` measured on this machine), and the fastest configuration that fits (`auto`)."""

"""The project's own tasks (tests and the CPU demo): the chain task, its synthetic ``mc`` output, tiny
HF checkpoints built locally, the toy completer, and the demo."""

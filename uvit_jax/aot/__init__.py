"""Ahead-of-time compilation of a config's programs for any devices (compile-only TPU slices
included), and what the compiler says of them: memory per chip, FLOPs, collectives, roofline."""

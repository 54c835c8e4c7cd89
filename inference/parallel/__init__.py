"""The parallel stage: Ulysses sequence parallelism, process groups and context, FSDP2, the SPMD engine and
the parity self-test. Imports the model side (the ``sp`` protocol), never the reverse."""

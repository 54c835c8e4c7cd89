"""Video half of a job: scene composition, encoders, the MultiTalk DiT, sampler and the parallel engine."""

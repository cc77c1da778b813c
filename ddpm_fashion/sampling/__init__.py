"""Sampling a saved DDPMPipeline: loading it, the reverse process in batches, samples files, pictures, own vs
library."""

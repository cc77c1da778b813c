"""The diffusion process: DDPM (read beside the paper), DDIM ending early, the noise schedules and their figures."""

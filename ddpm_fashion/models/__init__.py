"""The network: our U-Net (the architecture of diffusers' UNet2DModel), its blocks, and the configurations it builds."""

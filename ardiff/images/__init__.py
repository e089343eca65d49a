"""Images: discrete grey-level tokens through the text backbone (AR, MDLM, BD3) and ACDiT-style continuous blockwise
autoregressive diffusion over patches. See docs/images.md."""

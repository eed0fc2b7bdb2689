"""Guest images: recipes, kernels, initramfs, the image store."""

"""Model zoo and the name registry (`fmnist/...`, `torchvision/...`, `timm/...`)."""

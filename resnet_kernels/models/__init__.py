"""torchvision-compatible ResNets built from the fused modules (see the drop-in ResNet issue)."""

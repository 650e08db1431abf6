"""05 · Transfer learning: torchvision's ResNet-18 with ImageNet weights, fine-tuned on SVHN.

Question: do ImageNet features help with digits, in-domain and on MNIST?
Differs from 01_base in the network (torchvision's resnet18, ResNet18_Weights.IMAGENET1K_V1, ImageNet
normalization) and a lower peak lr, as the weights are already good. How 32x32 digits meet the ImageNet
stem is --transfer-input: upsample64 (default: 2x upsampling, no max-pool, every pretrained weight
kept, the forward FLOPs of 01's network), upsample224 (ImageNet resolution and stem), stem3x3 (a new
3x3 stem). --no-pretrained is the control: the same network and adapter from a random init, so that
05 minus its control is the effect of the ImageNet weights alone. Needs the weights in torchvision's
cache (downloaded when online) or --weights PATH.
    python 05_transfer.py [--transfer-input upsample64] [--no-pretrained] [--quick]
"""
from common import Config, cli, run

CONFIG = Config(
    name="05_transfer",
    arch="imagenet_resnet18",  # the variable under study
    lr=0.02,                   # fine-tuning: a 0.1 peak would wash out the pretrained features
)

if __name__ == "__main__":
    run(cli(CONFIG))

"""Train any timm model with SCHEME mixers, then fuse, verify and export; same as `timm-scheme train`.

    python examples/train.py                                   # ViT-Tiny, scikit-learn's digits, 10 epochs
    python examples/train.py --model vit_tiny_patch16_224 --model-kwargs embed_dim=96 depth=6 \
        --epochs 30 --cca --cca-anneal-start 0 --output output/digits_anneal  # with CCA, annealed throughout
    python examples/train.py --model schemeformer_ppaa_s12_224 --data-dir /data/imagenette --img-size 160
    python examples/train.py --resume output/train/checkpoint.pth   # continue an interrupted run
"""
import sys

from timm_scheme.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

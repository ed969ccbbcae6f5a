"""Common code of the toolkit: the ViT backbone, checkpoints, depth normalisation, configs and
distributed helpers. Used by data_prep/, pretrain/ and detect/; depends on none of them."""

__version__ = "0.1.0"

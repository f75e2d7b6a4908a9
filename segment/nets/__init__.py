"""The network: a residual-encoder U-Net with switchable long skips. `build_model(cfg)` is the only constructor."""

from segment.nets.blocks import ResidualBlock, center_crop
from segment.nets.summary import summarize, summary_text
from segment.nets.unet import UNet, build_model, receptive_field, receptive_fields

__all__ = ["ResidualBlock", "UNet", "build_model", "center_crop", "receptive_field", "receptive_fields", "summarize", "summary_text"]

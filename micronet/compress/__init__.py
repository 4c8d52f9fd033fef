"""Compression state on the modules: masks, quantizers, BN recalibration, the integer deploy form."""

from micronet.compress.bn import recalibrate_bn_
from micronet.compress.integer import deploy_form
from micronet.compress.layout import apply_layout, compression_layout
from micronet.compress.parametrizations import ActQuantizer, WeightMask, WeightQuantizer, least_squares_scale
from micronet.compress.quant import QuantConfig, calibrate_activations_, quantize_, refit_weight_scales_
from micronet.compress.sparsity import SparsityConfig, freeze_masks_, prune_, update_masks_
from micronet.compress.state import input_quantizer, is_quantized, weight_mask, weight_quantizer
from micronet.compress.summary import compression_rows, compression_summary

__all__ = [
    "ActQuantizer", "QuantConfig", "SparsityConfig", "WeightMask", "WeightQuantizer", "apply_layout",
    "calibrate_activations_", "compression_layout", "compression_rows", "compression_summary", "deploy_form",
    "freeze_masks_", "input_quantizer", "is_quantized", "least_squares_scale", "prune_", "quantize_",
    "recalibrate_bn_", "refit_weight_scales_", "update_masks_", "weight_mask",
    "weight_quantizer",
]

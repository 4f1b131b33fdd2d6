"""Lymph-node segmentation finetuning: losses, frozen-layer strategies, few-shot subsets, site presets."""

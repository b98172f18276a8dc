"""Data loading for training: blend files and megatron-core datasets."""

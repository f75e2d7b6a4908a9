"""Experiments that train and evaluate several models: the skip-connection ablation (`segment ablate`)."""

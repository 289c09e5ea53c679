"""Evaluators made for the nano world: a detector, and (in progress) FID and CLIP networks trained on it."""

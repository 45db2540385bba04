"""Test-only stand-in for flash_attn (CUDA-only): OpenRLHF imports it at module level."""
